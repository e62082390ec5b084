"""Contractive training: a penalty that keeps each IM-block's Picard map a contraction.

Block i iterates g <- T_i(g) = g0 + eta * f_i(g) (g0 + s_i * eta * f_i(g) for a block
that solves the stage of its step, `ModelConfig.stage_fraction`; J below is then
s_i * eta * df_i/dg). Picard and Anderson converge when T_i
is a contraction, i.e. when ||J||_2 < 1 for J = eta * df_i/dg along the iteration
(`minet_jax.stability` measures this; the released weights violate it). Training with

    loss = reconstruction + contractive_weight * penalty(model, batch)

pushes every block's estimated ||J||_2 below ``contractive_target``:

    penalty = sum_i mean_over_samples max(0, sigma_i - target_i)^2,

(summed over the stages of a two-stage block, `ModelConfig.stages`, each at its own
solution) where sigma_i estimates ||J||_2 at a point g_i of the block's Picard path (a
random iterate, see `operating_points`) by ``contractive_iters`` steps of power iteration
on J^T J (`minet_jax.stability.spectral`; one jvp and one vjp each; J is block diagonal over the
batch, so each sample has its own vector and estimate). The vector and the
operating point are held constant (stop-gradient); only the final sigma_i = ||J v||
is differentiated, with respect to the parameters of f_i (the usual treatment of
spectral-norm estimates, as in spectral normalisation). A few steps from a random
start give a lower bound that tightens as training proceeds. The "radius" kind starts
instead from the point's Picard residual T(g) - g, which the solve has already turned
towards J's dominant mode (`residual_start`), so a few steps come much closer to rho.
Its gradient, that of ||J v|| with v held, is d rho only for a normal J; the
"radius_exact" kind (`block_radius_exact`) also runs power iteration on J^T and
differentiates J projected onto both iterations' planes, whose derivative is the
dominant eigenvalue's own (`spectral.projected_radius`).

Why a penalty and not spectrally normalised convolutions: f_i's instance norms divide
by the feature statistics, so their Jacobian can be large whatever the conv
weights' norms are (and is invariant to scaling those weights); bounding the convs
alone does not bound J. The penalty measures J itself.

`penalty` takes a batch of images and checks each block at a random Picard iterate
(``contractive_point`` "iterate"); `penalty_at_points` takes one ``(g0, g)`` pair, or one
per stage, per block (at the solutions, "solution"). The training step
(``minet_jax.train.step``) calls the one its config's ``contractive_point`` names;
`weighted_penalty` is `penalty` weighted, a constant 0 when ``contractive_weight`` is 0
(the default).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from minet_jax.core import model as model_lib
from minet_jax.stability import spectral
from minet_jax.core.config import CONTRACTIVE_KINDS, ModelConfig, block_indices, is_count
from minet_jax.core.params import Params, model_from_params

ModelLike = Union[model_lib.MINet, Params]


def _as_model(model_or_params: ModelLike) -> model_lib.MINet:
  if isinstance(model_or_params, Params):
    return model_from_params(model_or_params)
  if isinstance(model_or_params, model_lib.MINet):
    return model_or_params
  raise TypeError("penalty needs a minet_jax.MINet or minet_jax.Params, got "
                  f"{type(model_or_params).__name__}")


def _in_dtype(operator: spectral.Operator, dtype) -> spectral.Operator:
  """``operator`` taking vectors of any dtype: `spectral.unit` returns float32, and a
  linearisation at bfloat16 features takes bfloat16 tangents only."""
  return lambda v: operator(v.astype(dtype))


def _maps_at(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array
             ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array],
                        Callable[[jax.Array], jax.Array]]:
  """The block's solved map z -> T(z; g0) at the point ``g``, for the estimators:
  (``g`` as a constant, T with f's parameters held constant, T with them live).

  The estimators iterate on the held map (no gradient through the iteration) and
  differentiate one last product through the live one; g0 and g are constants.
  """
  t_map, state = block.map_fn()
  g0 = jax.lax.stop_gradient(g0)
  frozen = jax.lax.stop_gradient(state)
  return (jax.lax.stop_gradient(g), lambda z: t_map(z, (g0, frozen)),
          lambda z: t_map(z, (g0, state)))


def block_spectral_norm(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array,
                        key: jax.Array, num_iters: int) -> jax.Array:
  """Per-sample power-iteration estimate of ||J||_2 (J: the solved map's Jacobian) at ``g``, shape (batch,).

  Differentiable with respect to the block's parameters; ``g0`` and ``g`` are
  treated as constants.
  """
  g, held, live = _maps_at(block, g0, g)
  matvec, rmatvec = spectral.linearise(held, g)
  v0 = jax.random.normal(key, g.shape, g.dtype)
  v, _ = spectral.top_singular_vector(_in_dtype(matvec, g.dtype), _in_dtype(rmatvec, g.dtype),
                                      v0, num_iters=num_iters, per_sample=True)
  v = jax.lax.stop_gradient(v).astype(g.dtype)
  # Only this last product sees the live parameters: sigma = ||J v|| is what is differentiated.
  _, jv = jax.jvp(live, (g,), (v,))
  return spectral.norm(jv, per_sample=True)


def block_frobenius(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array, key: jax.Array,
                    num_probes: int) -> jax.Array:
  """Per-sample Hutchinson estimate of ||J||_F^2 / n (J: the solved map's Jacobian) at ``g``, shape (batch,).

  E ||J v||^2 = ||J||_F^2 for v ~ N(0, I); divided by the number n of elements of a
  sample it is the mean squared singular value of J. ``num_probes`` jvps, averaged.
  Differentiable with respect to the block's parameters; ``g0`` and ``g`` are constants.
  """
  g, _, live = _maps_at(block, g0, g)
  n = g[0].size
  total = jnp.zeros((g.shape[0],), jnp.float32)
  for k in jax.random.split(key, num_probes):
    v = jax.random.normal(k, g.shape, g.dtype)
    _, jv = jax.jvp(live, (g,), (v,))
    total = total + jnp.square(spectral.norm(jv, per_sample=True))
  return total / (num_probes * n)


def block_radius(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array, key: jax.Array,
                 num_iters: int) -> jax.Array:
  """Per-sample power-iteration estimate of rho(J) (J: the solved map's Jacobian) at ``g``, shape (batch,).

  ``num_iters`` steps v <- J v / ||J v|| (jvps only), started from the Picard residual
  T(g) - g (`residual_start`), then ||J v|| for the final unit v: for a real dominant
  eigenvalue (the released blocks' 2-cycles come from one near -rho) this tends to
  rho; for a complex pair ||J v|| rotates with v and only comes near rho (above or
  below). Only the final product is differentiated, as in `block_spectral_norm`.
  """
  noise = jax.random.normal(key, g.shape, g.dtype)
  return block_radius_from(block, g0, g, noise, num_iters, from_residual=True)[0]


# Weight of the random part of `residual_start`'s vector, relative to the residual's.
_RESIDUAL_START_NOISE = 1e-3


def residual_start(residual: jax.Array, noise: jax.Array) -> jax.Array:
  """The start vector of a radius estimate at a solver's answer g: per-sample unit
  ``residual`` (T(g) - g) plus a little unit ``noise``, or the noise where the residual is 0.

  Near a fixed point the Picard residual obeys r_{k+1} ~ J r_k, so after k Picard
  steps the solve has already run k power-iteration steps on J: its residual leans
  towards the dominant mode. From random noise that mode, often confined to a few
  channels, needs many more steps to surface (measured on the 0.3-scaled released
  block 3 at a 1e-3 answer on an ITS image: 1.17 after 4 steps from the residual, 0.56
  from noise, 1.37 converged). The gain is largest at a late Picard iterate (a
  solver's answer); at an early one, or at a point no Picard run reached, the residual
  is no better a start than noise. The noise only keeps a small component in every
  direction: a residual with no share of the dominant mode hides it for many steps.
  """
  r = spectral.unit(residual, per_sample=True)
  return spectral.unit(r + _RESIDUAL_START_NOISE * spectral.unit(noise, per_sample=True),
                       per_sample=True)


def block_radius_from(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array, v: jax.Array,
                      num_iters: int, *, from_residual: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
  """`block_radius` from a given per-sample vector ``v``: (estimate, the final unit v).

  Feeding the returned vector back in at the next call (as spectral normalisation
  keeps its vector) continues the power iteration across training steps, so a few
  steps per call give an estimate that sharpens over training. With
  ``from_residual`` the iteration starts from `residual_start` (T(g) - g, with ``v``
  as its noise) instead. The vector is a constant for differentiation.

  The value is the radius estimate ||J v||, v the converged dominant eigenvector; the
  gradient is that of ||J v|| with v held, sign(lambda) v^T dJ v. That is d rho only
  for a normal J: an IM-block's Jacobian is strongly non-normal, and there the exact
  d rho = u^T dJ v / u^T v (u the left eigenvector) can differ in size and, per
  parameter, in sign. The penalty is this surrogate; it still lowers rho in the
  trainings measured (docs/STABILITY.md).
  """
  g, held, live = _maps_at(block, g0, g)
  t_g, matvec = jax.linearize(held, g)
  v = residual_start(t_g - g, v) if from_residual else spectral.unit(v, per_sample=True)
  matvec = _in_dtype(matvec, g.dtype)
  v = jax.lax.fori_loop(0, num_iters, lambda _, v: spectral.unit(matvec(v), per_sample=True),
                        jax.lax.stop_gradient(v))
  v = jax.lax.stop_gradient(v).astype(g.dtype)
  # Only this last product sees the live parameters: ||J v|| is what is differentiated
  # (not rho itself; see the docstring).
  _, jv = jax.jvp(live, (g,), (v,))
  return spectral.norm(jv, per_sample=True), v


def block_radius_exact(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array, key: jax.Array,
                       num_iters: int, *, with_found: bool = False
                       ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-sample rho(J) (J: the solved map's Jacobian) at ``g`` whose gradient is d rho, shape (batch,).

  ``num_iters`` power-iteration steps on J (jvps), from `block_radius`'s start, and as
  many on J^T (vjps) give planes that hold J's and J^T's dominant eigenvectors
  (`spectral.power_pair`); the estimate is J projected onto them
  (`spectral.projected_radius`), and only the two products J q of the right plane see
  the live parameters. Where `block_radius`'s gradient is that of ||J v|| with v held
  (d rho only for a normal J), this one is the dominant eigenvalue's own derivative,
  u^T dJ v / u^T v, for a real eigenvalue and for a complex pair, once both planes
  hold the eigenvectors; its value reaches a complex pair's modulus too. About twice
  the products of `block_radius`. A sample whose planes give no eigenpair of J to
  within 10 % (or planes too close to orthogonal) gets `block_radius`'s estimate and
  gradient instead, the same number from the same start (to rounding in bfloat16);
  ``with_found`` also returns where the projection was used (a boolean per sample).
  """
  g, held, live = _maps_at(block, g0, g)
  t_g, matvec = jax.linearize(held, g)
  transpose = jax.linear_transpose(matvec, g)
  rmatvec = _in_dtype(lambda w: transpose(w)[0], g.dtype)
  matvec = _in_dtype(matvec, g.dtype)
  residual = t_g - g
  right = spectral.power_pair(
      matvec, residual_start(residual, jax.random.normal(key, g.shape, g.dtype)),
      num_iters=num_iters, per_sample=True)
  # The left eigenvector is not the residual's direction, but overlaps it wherever the
  # right one does (u^T v != 0 for a simple eigenvalue): as good a start as any.
  left = spectral.power_pair(
      rmatvec, residual_start(residual, jax.random.normal(jax.random.fold_in(key, 1),
                                                          g.shape, g.dtype)),
      num_iters=num_iters, per_sample=True)
  right, left = spectral.pair_planes(right, left, per_sample=True)
  # The planes in the features' dtype, so that the overlaps and the products agree.
  right, left = jax.lax.stop_gradient(jax.tree.map(
      lambda x: x.astype(g.dtype) if x.ndim == g.ndim else x, (right, left)))
  # One linearisation with the live parameters serves both products.
  _, live_matvec = jax.linearize(live, g)
  j_right = (live_matvec(right[0]), live_matvec(right[1]))
  radius, found = spectral.projected_radius(right, left, j_right,
                                            (rmatvec(left[0]), rmatvec(left[1])),
                                            per_sample=True)
  # block_radius's estimate: ||J v_k|| with v_k = a q1 + c q2 the last power iterate
  # (where q2 was replaced, c is below 1e-5 and the term is rounding).
  shape = (-1,) + (1,) * (g.ndim - 1)
  a, c = right[2].reshape(shape), right[3].reshape(shape)
  one_sided = spectral.norm(a * j_right[0] + c * j_right[1], per_sample=True)
  estimate = jnp.where(found, radius, one_sided)
  return (estimate, found) if with_found else estimate


def block_term(block: model_lib.IMBlock, g0: jax.Array, g: jax.Array, key: jax.Array, *,
               kind: str, num_iters: int, target: float) -> tuple[jax.Array, jax.Array]:
  """One block's penalty (batch mean) and the figure it is made of (batch mean).

  "spectral": mean_b max(0, sigma_b - target)^2 and sigma (`block_spectral_norm`);
  "radius": the same hinge on the spectral-radius estimate (`block_radius`): Theorem
  1's own condition, far weaker than a bound on the norm;
  "radius_exact": the same hinge on `block_radius_exact`, whose gradient is d rho
  itself rather than `block_radius`'s surrogate, for twice the products;
  "frobenius": mean_b ||J||_F^2 / n and the same (`block_frobenius`).
  """
  if kind in ("spectral", "radius", "radius_exact"):
    estimate = {"spectral": block_spectral_norm, "radius": block_radius,
                "radius_exact": block_radius_exact}[kind]
    sigma = estimate(block, g0, g, key, num_iters)
    return jnp.mean(jnp.square(jax.nn.relu(sigma - target))), jnp.mean(sigma)
  if kind == "frobenius":
    fro = block_frobenius(block, g0, g, key, num_iters)
    return jnp.mean(fro), jnp.mean(fro)
  raise ValueError(f"unknown penalty kind {kind!r}; choose one of {CONTRACTIVE_KINDS}")


def fixed_point_mismatch(block: model_lib.IMBlock, g0: jax.Array, target: jax.Array,
                         steps: int = 1, *,
                         stage_points: Sequence[tuple[jax.Array, jax.Array]] | None = None
                         ) -> jax.Array:
  """How far ``target`` is from being the block's answer from ``g0``, per sample, shape (batch,).

  With (b, k) the last stage's base and solution in the step that answers ``target``
  (`IMBlock.stage_points`: for a one-stage block b = g0 and k = `IMBlock.stage_of`
  (g0, target), for implicit Euler ``target`` itself; for a two-stage block k is
  ``target`` and b the base c that the first stage, solved from g0, gives it) and
  T(g) = b + stage_fraction * eta * f(g):
  ||T(k_{m-1}) - k||^2 / ||k - g0||^2, where k_0 = k and k_j = T(k_{j-1}) are ``steps``
  = m Picard steps warm-started at k. Zero when ``target`` is the block's answer with its
  stages solved exactly (at a tolerance, about the last stage's residual), relative to
  the size of the step to k. With a teacher's block input and output it
  trains f so that the teacher's output becomes its fixed point (configs/stable.py); a
  one-stage block needs no solve.

  m = 1 is the one-step residual T(k) - k. The error of the block's own answer is
  k* - k = (I - J)^{-1} (T(k) - k) to first order (J = dT/dg, k* its fixed point), larger
  than the residual wherever J is near 1; the m-step distance k_m - k sums the first m
  terms of that series, so larger m weighs the answer's error rather than the
  residual. Only the last step is differentiated (the first m - 1 are constants, as in
  Jacobian-free backprop): m - 1 more f evaluations, no more memory. ``stage_points``:
  `IMBlock.stage_points` (g0, target) when the caller has them already (a two-stage
  block's first stage is then not solved again).
  """
  if not is_count(steps):
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  t_map, state = block.map_fn()
  g0 = jax.lax.stop_gradient(g0)
  if stage_points is None:
    stage_points = block.stage_points(g0, jax.lax.stop_gradient(target))
  base, target = stage_points[-1]
  target = jax.lax.stop_gradient(target)
  start = jax.lax.stop_gradient(jax.lax.fori_loop(
      0, steps - 1, lambda _, g: t_map(g, (base, state)), target))
  residual = spectral.norm(t_map(start, (base, state)) - target, per_sample=True)
  step = spectral.norm(target - g0, per_sample=True)
  return jnp.square(residual) / jnp.maximum(jnp.square(step), jnp.finfo(jnp.float32).tiny)


def random_iterate(block: model_lib.IMBlock, g0: jax.Array, key: jax.Array) -> jax.Array:
  """The Picard iterate g_k of ``block`` from ``g0``, k uniform in {0, ..., T} (no gradient)."""
  t_map, state = block.map_fn()
  k = jax.random.randint(key, (), 0, block.iterations + 1)
  g = jax.lax.fori_loop(0, k, lambda _, z: t_map(z, (g0, state)), g0)
  return jax.lax.stop_gradient(g)


def operating_points(model: model_lib.MINet, images: jax.Array, *,
                     key: jax.Array | None = None) -> list[Any]:
  """(g0, g) of every IM-block on RGB [0, 1] NHWC ``images`` (even H and W).

  Without ``key``, g is the block's solution (``result.value``: its output for
  implicit Euler, its stage for a one-stage block); a two-stage block gives a list of
  its stages' (base, solution) pairs instead (`BlockRun.points`), as
  `penalty_at_points` takes them. With ``key`` (one-stage blocks), g is the Picard iterate
  g_k from g0 with k drawn uniformly from {0, ..., T} per block (the batch shares k),
  so that over training the penalty covers the whole path the iteration takes,
  not one point of it: a map that contracts at its output can still cycle (for an
  even T the output can sit on one point of a 2-cycle whose other point is never
  checked). Either way the next block starts from this block's output (`BlockRun.output`).
  """
  cfg = model.config
  runs = model.solve_blocks(model_lib.to_model_space(images, cfg).astype(cfg.dtype))
  if key is None:
    return [run.points[0] if len(run.points) == 1 else list(run.points) for run in runs]
  keys = jax.random.split(key, len(runs))
  return [(run.g0, random_iterate(block, run.g0, k))
          for block, run, k in zip(model.im_blocks, runs, keys)]


def _settings(cfg: ModelConfig, num_iters: int | None,
              target: float | Sequence[float] | None) -> tuple[int, tuple[float, ...]]:
  """The power-iteration steps and the per-block targets to use, the config's where not given."""
  num_iters = cfg.contractive_iters if num_iters is None else int(num_iters)
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  if target is None:
    return num_iters, cfg.contractive_target
  # The config's own normalisation: one number or one per block, finite and >= 0.
  try:
    return num_iters, dataclasses.replace(cfg, contractive_target=target).contractive_target
  except ValueError as e:
    raise ValueError(f"target: {e}") from None


def penalty(model_or_params: ModelLike, images: jax.Array | Mapping[str, jax.Array], *,
            key: jax.Array, num_iters: int | None = None,
            target: float | Sequence[float] | None = None,
            per_block: bool = False, blocks: Sequence[int] | None = None) -> jax.Array:
  """Contractivity penalty sum_i mean_b max(0, sigma_ib - target_i)^2 on a batch of images.

  Each block is checked at a random iterate of its Picard path (`operating_points`);
  the model runs its encoder and blocks on ``images`` for that. Where the points are
  already at hand, `penalty_at_points` skips that run.

  Args:
    model_or_params: a `minet_jax.MINet` or `minet_jax.Params`.
    images: RGB [0, 1] NHWC with even H and W, or a training batch (a mapping that
      holds them under ``"hazy"``).
    key: PRNG key for the random iterates and the power iterations' start vectors.
    num_iters: power-iteration steps; default ``config.contractive_iters``.
    target: the norm to stay below, one for every block or one per block; default
      ``config.contractive_target``.
    per_block: also return the (batch-mean) sigma of every block penalised, in block
      order, shape (number of blocks,).
    blocks: the 0-based indices of the blocks to penalise (None: all; as for
      `penalty_at_points`).

  Returns:
    The scalar penalty (unweighted), or ``(penalty, sigmas)`` with ``per_block``.
  """
  model = _as_model(model_or_params)
  num_iters, target = _settings(model.config, num_iters, target)
  two_stage = [i + 1 for i in block_indices(blocks, len(model.im_blocks))
               if model.config.stages[i] > 1]
  if two_stage:
    raise ValueError(f"penalty checks random Picard iterates of one-stage blocks; block(s) "
                     f"{two_stage} have two stages, which are checked at their solutions: "
                     "penalty_at_points with MINet.solve_blocks' BlockRun.points")
  if isinstance(images, Mapping):
    if "hazy" not in images:
      raise ValueError("a batch mapping must hold the input images under 'hazy'")
    images = images["hazy"]
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 2 or images.shape[2] % 2:
    raise ValueError(f"images must be NHWC RGB with even H and W, got {images.shape}")
  key, point_key = jax.random.split(key)
  points = jax.lax.stop_gradient(operating_points(model, images, key=point_key))
  return penalty_at_points(model, points, key=key, num_iters=num_iters, target=target,
                           per_block=per_block, blocks=blocks)


def penalty_at_points(model_or_params: ModelLike,
                      points: Sequence[tuple[jax.Array, jax.Array]], *, key: jax.Array,
                      num_iters: int | None = None,
                      target: float | Sequence[float] | None = None,
                      per_block: bool = False,
                      blocks: Sequence[int] | None = None) -> jax.Array:
  """`penalty` at given operating points instead of a batch of images.

  Args:
    model_or_params: a `minet_jax.MINet` or `minet_jax.Params`.
    points: per IM-block, one ``(g0, g)`` pair, the block's input and the point to
      check, NHWC features (from `operating_points`), or a sequence of such pairs,
      one per stage to check (``BlockRun.points`` from ``MINet.solve_blocks``, or
      `IMBlock.stage_points`): the block's term is then the sum over its pairs and its
      figure the largest. Points at hand save running the encoder and the blocks again.
    key: PRNG key for the power iterations' start vectors.
    num_iters, target, per_block: as for `penalty`.
    blocks: the 0-based indices of the blocks to penalise (None: all); the others'
      points are not looked at, and each block's start vector is the one it gets when
      all are penalised.
  """
  model = _as_model(model_or_params)
  num_iters, target = _settings(model.config, num_iters, target)
  points = list(points)
  if len(points) != len(model.im_blocks):
    raise ValueError(f"got {len(points)} operating points for {len(model.im_blocks)} "
                     "IM-blocks; pass one (g0, g) pair, or one per stage, per block")
  chosen = block_indices(blocks, len(points))
  keys = jax.random.split(key, len(points))
  total = jnp.float32(0.0)
  sigmas = []
  for i in chosen:
    block, k, block_target = model.im_blocks[i], keys[i], target[i]
    pairs = stage_pairs(points[i])
    terms = [block_term(block, g0, g, stage_key, kind=model.config.contractive_kind,
                        num_iters=num_iters, target=block_target)
             for (g0, g), stage_key in zip(pairs, spectral.stage_keys(k, len(pairs)))]
    total = total + sum(term for term, _ in terms)
    sigmas.append(functools.reduce(jnp.maximum, [sigma for _, sigma in terms]))
  return (total, jnp.stack(sigmas)) if per_block else total


def stage_pairs(points: Any) -> list[tuple[jax.Array, jax.Array]]:
  """One block's operating points as a list of ``(base, g)`` pairs: a single pair, or a
  sequence of them (one per stage), as `penalty_at_points` takes them."""
  points = list(points)
  if len(points) == 2 and all(hasattr(p, "shape") for p in points):
    return [tuple(points)]
  if not points or any(len(p) != 2 or not all(hasattr(a, "shape") for a in p) for p in points):
    raise ValueError("a block's operating points must be one (g0, g) pair of arrays or a "
                     "sequence of such pairs, one per stage")
  return [tuple(p) for p in points]


def weighted_penalty(model_or_params: ModelLike, images: jax.Array | Mapping[str, jax.Array],
                     *, key: jax.Array) -> jax.Array:
  """``config.contractive_weight * penalty(...)``; a constant 0 when the weight is 0.
  For ``contractive_point`` "iterate" (`penalty`'s points) only."""
  model = _as_model(model_or_params)
  weight = model.config.contractive_weight
  if weight == 0.0:
    return jnp.float32(0.0)
  if model.config.contractive_point != "iterate":
    raise ValueError(f"weighted_penalty checks random iterates, but the config's "
                     f"contractive_point is {model.config.contractive_point!r}: use "
                     "penalty_at_points at the solutions")
  return weight * penalty(model, images, key=key)
