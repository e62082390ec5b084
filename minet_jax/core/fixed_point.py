"""Fixed-point engine for the IM-blocks: solver objects, adjoint objects, one call.

This docstring is the one place the maths is written down; the model, the config
and the docs refer here.

Problem
-------
An IM-block takes one implicit Euler step of dx/dt = f(x) with step eta,

    x_{k+1} = x_k + eta * f(x_{k+1}),

i.e. it looks for the fixed point z* = T(z*) of T(z) = x_k + eta * f(z). Picard
iteration z_{j+1} = T(z_j) from z_0 = x_k is what the paper writes as
g_{j+1} = g_0 + eta * f(g_j); by Banach's theorem it converges when T is a
contraction, and Theorem 1 of the paper states the local condition: every eigenvalue
lambda of df/dz at the fixed point has |lambda| < 1/eta (`minet_jax.stability`
checks it on real weights).

Calling convention
------------------
``fixed_point(fn, solver, z0, args, *, max_steps, adjoint=Backprop(), per_sample=False)``.
``fn(z, args) -> z'`` is the map T and ``args`` a pytree of everything it depends on
(parameters, g0), so that gradients with respect to ``args`` are well defined. The
solver object says how to iterate, the adjoint object how to differentiate, and
``max_steps`` caps the map evaluations (every step is one evaluation of ``fn``). The
answer is a `FixedPointResult`: the solution, a status per sample (`RESULTS`), the
steps taken and the residuals. `from_config` builds the objects a `ModelConfig`
names. The objects are frozen, hashable dataclasses: static under ``jax.jit``.

Solvers
-------
`Unrolled`   exactly ``max_steps`` Picard steps (``lax.scan``): the released model
    (T = 8). It never stops early; its tolerances only decide the reported status.
`Picard`     z_{j+1} = T(z_j) until the stopping test below holds or ``max_steps``.
`Anderson`   Anderson acceleration (type II, Walker & Ni 2011) with history m:
    after evaluating F_k = T(x_k) and G_k = F_k - x_k, pick weights alpha over the
    last m pairs minimising ||sum_i alpha_i G_i|| subject to sum_i alpha_i = 1,
    i.e. alpha proportional to (H + lambda I)^{-1} 1 with H_ij = <G_i, G_j>, and
    step to x_{k+1} = sum_i alpha_i (F_i - (1 - beta) G_i) (beta = 1: undamped).
    H is normalised by its mean diagonal before adding lambda = ``reg``, so the
    Tikhonov term is relative and the m x m solve (float32) is scale-free. A
    breakdown of that solve (non-finite weights) falls back to a Picard step.

Residual and stopping test
--------------------------
The residual of step j is that of the point it evaluated,
r_j = ||T(x_j) - x_j|| / ||T(x_j)|| (for Picard exactly ||z_{j+1} - z_j|| / ||z_{j+1}||),
in float32. The test is ``rms(T(x) - x) <= atol + rtol * rms(T(x))``: a ratio of
RMS norms over the whole sample (``atol`` is per element, so it does not depend on
the image size; with ``atol = 0`` it is r_j <= rtol). The returned value is the last
evaluation T(x_j), not x_j. Where T(x_j) = 0 and x_j is not, r_j is float32's largest
number (the point is finite, just far). The norms are float32 sums of squares, which
underflow for values below about 1e-19: a problem at such magnitudes should be scaled
by its caller (a residual that underflows reads as 0 and passes the test; rescaling
inside the test would hold another copy of the iterate at every step).

Status
------
Each sample ends with one `RESULTS` code: ``successful`` (the test held at its last
step), ``max_steps_reached`` (it never held; for `Unrolled` this means the last
step missed the tolerance, and with the default zero tolerances it is what an
unrolled solve reports unless it lands exactly on the fixed point), or
``nonfinite`` (a residual became inf or NaN: the iterates, or their float32 sums of
squares, overflowed; Picard and Anderson stop that sample there). Divergence is seen
only once it is non-finite; a map that grows without overflowing within
``max_steps`` reports ``max_steps_reached``.

Batches
-------
With ``per_sample=True`` the leading axis of every leaf of ``z`` indexes independent
problems (``fn`` must act on each sample separately, as MI-Net's convolutions and
instance norms do): residuals, stopping, status and Anderson's weights are per
sample, a finished sample is frozen (``jnp.where``) while the others go on, and the
diagnostics gain a leading batch axis. The loop runs while any sample is active, on
the whole batch; the early-exit loop over a batch of one freezes nothing (it runs only
while its sample is active), so it skips the whole-map selects. With
``per_sample=False`` the whole pytree is one problem. Per sample is the right choice
for instance-normalised networks: the batch's problems do not interact, and one hard
image neither holds back nor steers the others.

Adjoints (how gradients are taken)
----------------------------------
`Backprop` differentiates through the iterations. ``lax.while_loop`` has no
reverse-mode rule, so for `Picard`/`Anderson` only the evaluation stops early: under
differentiation (a custom JVP rule) they run the equivalent ``lax.scan`` of
``max_steps`` masked steps (finished samples frozen, their remaining evaluations
wasted), and memory and time grow with ``max_steps``. `Unrolled` is a scan already.
Anderson's weights are differentiated too, except once a sample's residual is at
float32 rounding (below 8 eps relative to T(g)): a fit to noise is ill-posed, and its
derivative amplified the gradient many orders of magnitude; there they count as
constants. A solve of ``max_steps`` 0 answers z0, differentiated as z0, whatever the
adjoint.

`Implicit` uses the implicit function theorem through ``jax.custom_vjp``. At a fixed
point z* = T(z*, a), dz*/da = (I - dT/dz)^{-1} dT/da, so for an output cotangent
z_bar the input cotangent is a_bar = u dT/da, where the row vector u solves
u = z_bar + u dT/dz, itself a fixed point of the linear map u -> z_bar + vjp_z(u).
It is solved from u = z_bar with the forward's solver family (its own step limit and
tolerances, `Implicit` fields; None means the forward's); Picard on it converges
exactly when rho(dT/dz) < 1 at z*, the forward's own local condition, and `Unrolled`
sums the first ``max_steps + 1`` terms of the Neumann series z_bar (I + J + J^2 + ...)
with J = dT/dz at z* (the start z_bar is the first; so on a linear map it is one term
more than `Backprop` through ``max_steps`` unrolled steps). Only z* and one
linearisation of T are kept, so memory does not grow with the number of iterations.
z0 gets a zero cotangent (the fixed point does not depend on where the search
starts); when T was not solved to tolerance the gradient is that of the fixed point
the solver was heading for, i.e. approximate.

Why not a library
-----------------
Checked against optimistix 0.1.0 (released 2026-02-16; its main branch of May 2026
is unchanged in these respects) with lineax 0.1.1:

* Solvers: ``optx.fixed_point`` takes ``FixedPointIteration`` (Picard with optional
  damping), ``BestSoFarFixedPoint``, or any root finder / least-squares solver /
  minimiser applied to T(y) - y (Newton, Chord, Levenberg-Marquardt, BFGS, ...).
  There is no Anderson acceleration.
* Stopping: ``FixedPointIteration`` stops when ``norm((y - T(y)) / (atol + rtol * |T(y)|)) < 1``,
  a norm (max by default; rms or two-norm selectable) of element-wise scaled errors,
  not the ratio of norms above; the state keeps only the last error, so there is
  no per-step residual history.
* Batches: one scalar termination test and one ``result`` code for the whole pytree.
  Per-sample stopping and status come only from ``jax.vmap`` over the solve, where
  ``fn`` sees one unbatched sample (MI-Net's NHWC layers would have to re-add the
  batch axis) and the vmapped loop, like ours, runs until the last sample is done.
  Its ``RESULTS`` (successful, nonlinear_max_steps_reached, nonfinite, ...) are what
  `RESULTS` here mirrors.
* Gradients: ``optx.ImplicitAdjoint(linear_solver=...)`` accepts any lineax solver
  for (dT/dy - I). The default ``lx.AutoLinearSolver(well_posed=None)`` picks LU for
  a square unstructured operator, which materialises the Jacobian (4.6M x 4.6M for
  one 64 x 230 x 310 feature map); an iterative solver (``lx.GMRES``,
  ``lx.BiCGStab``) keeps it matrix-free, but lineax has no Neumann/Picard iteration,
  the solve that reuses the forward's contraction and its step budget.
  ``RecursiveCheckpointAdjoint`` backpropagates through a checkpointed while loop.

jaxopt (which has Anderson acceleration) is no longer maintained. What is left -- two
loops, an m x m least-squares and a custom_vjp -- is written here.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np


__all__ = [
    "Anderson", "Backprop", "BACKWARDS", "FixedPointResult", "Implicit", "Phantom", "Picard",
    "RESULTS", "SOLVERS", "SolveSummary", "Unrolled", "fixed_point", "from_config", "resolve_unroll",
]

_HIGHEST = jax.lax.Precision.HIGHEST
Unroll = Union[str, int, bool]


class RESULTS(enum.IntEnum):
  """Per-sample outcome of a solve, stored as int32 in `FixedPointResult.status`."""
  successful = 0
  max_steps_reached = 1
  nonfinite = 2


@chex.dataclass(frozen=True)
class FixedPointResult:
  """A solve's answer and what it took to get there.

  With ``per_sample=True`` every diagnostic gains a leading batch axis.

  Attributes:
    value: the last evaluation T(z_J).
    status: `RESULTS` code (int32): successful, max_steps_reached or nonfinite.
    num_steps: map evaluations taken (int32).
    residual: final relative residual ||T(z_J) - z_J|| / ||T(z_J)|| (float32).
    residual_history: relative residual after each step, shape (max_steps,); NaN for
      steps not taken.
  """
  value: Any
  status: jax.Array
  num_steps: jax.Array
  residual: jax.Array
  residual_history: jax.Array


@chex.dataclass(frozen=True)
class SolveSummary:
  """What a user sees of a solve: `FixedPointResult` without the value and history.

  For a solve made of stages (a two-stage block), the fields are the stages' together
  (steps summed, the worse status and residual) and ``stage_steps`` / ``stage_status``
  hold each stage's, shape (batch, stages); None for one solve.
  """
  status: jax.Array
  num_steps: jax.Array
  residual: jax.Array
  stage_steps: Optional[jax.Array] = None
  stage_status: Optional[jax.Array] = None

  @classmethod
  def of(cls, result: FixedPointResult,
         stages: Sequence[FixedPointResult | SolveSummary] = ()) -> SolveSummary:
    """``result``'s summary; ``stages``: the stage solves it combines (or their
    summaries), if more than one. A one-stage and a two-stage summary are different
    pytrees (None against arrays in the stage fields)."""
    if len(stages) < 2:
      return cls(status=result.status, num_steps=result.num_steps, residual=result.residual)
    return cls(status=result.status, num_steps=result.num_steps, residual=result.residual,
               stage_steps=jnp.stack([r.num_steps for r in stages], axis=-1),
               stage_status=jnp.stack([r.status for r in stages], axis=-1))

  def at(self, index: int) -> tuple[int, RESULTS, float]:
    """Sample ``index``'s (steps, status, residual) as Python values (on the host)."""
    return (int(np.asarray(self.num_steps)[index]), RESULTS(int(np.asarray(self.status)[index])),
            float(np.asarray(self.residual)[index]))

  def stages_at(self, index: int) -> tuple[tuple[int, RESULTS], ...]:
    """Sample ``index``'s (steps, status) per stage, on the host: one pair for one solve."""
    if self.stage_steps is None:
      return ((int(np.asarray(self.num_steps)[index]),
               RESULTS(int(np.asarray(self.status)[index]))),)
    return tuple((int(n), RESULTS(int(c))) for n, c in zip(
        np.asarray(self.stage_steps)[index], np.asarray(self.stage_status)[index]))


def resolve_unroll(unroll: Unroll, length: int) -> Union[int, bool]:
  """Backend-aware unroll: full on XLA:CPU, rolled elsewhere.

  On XLA:CPU, gradients through a rolled scan of XLA's convolutions run many times
  slower than unrolled code (jax-ml/jax#12868; ``benchmarks/unroll_grad.py`` measures
  it, and docs/PERFORMANCE.md has the figures); on GPU/TPU a rolled loop compiles
  faster and costs little at run time.
  """
  if unroll == "auto":
    return True if jax.default_backend() == "cpu" else 1
  if unroll == "full":
    return True
  if isinstance(unroll, bool):
    return unroll
  if int(unroll) < 1:
    raise ValueError(f"unroll must be >= 1, got {unroll}")
  return min(int(unroll), max(length, 1))


# ------------------------------------------------------------------ checks


def _check_nonnegative(owner: str, *, none_allowed: bool = False,
                       **values: Optional[float]) -> None:
  """Each of ``values`` a finite number >= 0 (or None, where ``none_allowed``)."""
  for name, value in values.items():
    if value is None and none_allowed:
      continue
    if value is None or not (value >= 0 and np.isfinite(value)):
      raise ValueError(f"{owner}.{name} must be finite and >= 0, got {value!r}")


def is_integer(value: Any, minimum: int | None = None) -> bool:
  """An integer (of at least ``minimum``, when given): a Python, numpy or concrete JAX
  integer (all that `operator.index` takes), not a bool nor a float that happens to be
  whole."""
  if isinstance(value, bool):
    return False
  try:
    index = operator.index(value)
  except TypeError:
    return False
  return minimum is None or index >= minimum


def _check_steps(name: str, value: Optional[int], *, optional: bool = True) -> None:
  if (value is not None or not optional) and not is_integer(value, 0):
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def canonical_unroll(owner: str, unroll: Unroll) -> Union[str, int]:
  """``unroll`` checked, with True as "full" and False as 1: True == 1 in Python (and
  both hash alike), so a config or solver holding True would share the compiled
  program of one holding 1, a rolled loop instead of an unrolled one."""
  if isinstance(unroll, (bool, np.bool_)):
    return "full" if unroll else 1
  if isinstance(unroll, str) and unroll in ("auto", "full"):
    return unroll
  if not is_integer(unroll, 1):
    raise ValueError(f"{owner}.unroll must be 'auto', 'full', a bool or an int >= 1, got "
                     f"{unroll!r}")
  return operator.index(unroll)


def _check_unroll(owner: str, solver: Any) -> None:
  """Puts the solver's ``unroll`` in `canonical_unroll`'s form (solvers are frozen)."""
  object.__setattr__(solver, "unroll", canonical_unroll(owner, solver.unroll))


# ------------------------------------------------------------------ per-sample algebra
# Inside the solvers every leaf has a leading batch axis B; reductions give shape (B,).


def _sample_dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.sum((x.astype(jnp.float32) * y.astype(jnp.float32)).reshape(x.shape[0], -1),
                     axis=1)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _sample_size(z: Any) -> int:
  return sum(x[0].size for x in jax.tree.leaves(z))


def _batch_size(z: Any) -> int:
  return jax.tree.leaves(z)[0].shape[0]


def _select(mask: jax.Array, new: Any, old: Any) -> Any:
  """Per-sample choice between two pytrees (mask has shape (B,))."""
  def pick(n, o):
    return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(pick, new, old)


def _residual_test(fx: Any, x: Any, rtol: float, atol: float, n: int):
  """Relative residual per sample and whether it meets the stopping test."""
  diff = jax.tree.map(jnp.subtract, fx, x)
  dnorm = jnp.sqrt(_sample_dot(diff, diff))
  fnorm = jnp.sqrt(_sample_dot(fx, fx))
  big = jnp.finfo(jnp.float32).max
  # T(x) = 0 is a finite point: the relative residual is as large as float32 holds (0 at
  # x = 0), not the inf that would report an overflow.
  rel = jnp.where(fnorm > 0, jnp.minimum(dnorm / jnp.where(fnorm > 0, fnorm, 1.0), big),
                  jnp.where(dnorm > 0, big, 0.0))
  # A sum of squares can overflow float32 while the iterates are still finite; finite/inf
  # would then read as a zero residual, so an overflowed norm makes the residual NaN.
  rel = jnp.where(jnp.isfinite(fnorm) & jnp.isfinite(dnorm), rel, jnp.nan)
  # Compare in RMS units so that atol does not depend on the image size.
  scale = jnp.float32(n) ** -0.5
  return rel, dnorm * scale <= atol + rtol * fnorm * scale


class _Outcome(NamedTuple):
  """A solve on batched leaves; the fields of `FixedPointResult`, each with axis B."""
  value: Any
  status: jax.Array
  num_steps: jax.Array
  residual: jax.Array
  history: jax.Array


def _no_steps(z0: Any) -> _Outcome:
  batch = _batch_size(z0)
  return _Outcome(z0, jnp.full((batch,), RESULTS.max_steps_reached, jnp.int32),
                  jnp.zeros((batch,), jnp.int32), jnp.full((batch,), jnp.nan, jnp.float32),
                  jnp.zeros((batch, 0), jnp.float32))


# ------------------------------------------------------------------ solvers


@dataclasses.dataclass(frozen=True)
class Unrolled:
  """Exactly ``max_steps`` Picard steps in a ``lax.scan`` (the released model).

  Attributes:
    rtol, atol: decide only the reported status (does the last step meet the test?).
    unroll: ``lax.scan`` unroll; "auto" for `resolve_unroll`'s backend-aware default.
  """
  name: ClassVar[str] = "unrolled"
  # A fixed number of steps: a tolerance decides only the reported status.
  stops_at_tolerance: ClassVar[bool] = False
  rtol: float = 0.0
  atol: float = 0.0
  unroll: Unroll = "auto"

  def __post_init__(self) -> None:
    _check_nonnegative("Unrolled", rtol=self.rtol, atol=self.atol)
    _check_unroll("Unrolled", self)

  @classmethod
  def from_config(cls, cfg: Any) -> Unrolled:
    return cls(rtol=cfg.rtol, atol=cfg.atol, unroll=cfg.unroll)

  def _run(self, fn, z0, args, max_steps: int, differentiable: bool) -> _Outcome:
    del differentiable  # A scan is differentiable as it is.
    if max_steps == 0:
      return _no_steps(z0)
    n = _sample_size(z0)

    def step(z, _):
      z_new = fn(z, args)
      return z_new, _residual_test(z_new, z, self.rtol, self.atol, n)

    z, (history, met) = jax.lax.scan(step, z0, None, length=max_steps,
                                     unroll=resolve_unroll(self.unroll, max_steps))
    status = jnp.where(jnp.all(jnp.isfinite(history), axis=0),
                       jnp.where(met[-1], RESULTS.successful, RESULTS.max_steps_reached),
                       RESULTS.nonfinite).astype(jnp.int32)
    batch = history.shape[1]
    return _Outcome(z, status, jnp.full((batch,), max_steps, jnp.int32), history[-1],
                    history.T)


class _LoopState(NamedTuple):
  """Carry of the masked Picard/Anderson loop; per-sample fields have axis B."""
  step: jax.Array       # steps the batch has taken (scalar int32)
  x: Any                # the point each sample evaluates next
  value: Any            # each sample's last evaluation T(x_j); () where it is always x
  active: jax.Array     # (B,) bool: still iterating
  status: jax.Array     # (B,) int32 `RESULTS` code, final once inactive
  num_steps: jax.Array  # (B,) int32 evaluations taken
  residual: jax.Array   # (B,) float32 last relative residual
  history: jax.Array    # (B, max_steps) float32, NaN for steps not taken
  accel: Any            # the solver's own state: () for Picard, `_AndersonState`
  best: Any             # with best_so_far: (evaluation, residual) of lowest residual per
                        # sample so far (residual inf before the first step), and, where
                        # it is kept lazily (`_Iterative._best`), whether it is x; else ()


class _Iterative:
  """The masked loop shared by `Picard` and `Anderson` (they supply ``_init``/``_next``).

  Subclasses are dataclasses with ``rtol``, ``atol``, ``unroll`` and ``best_so_far`` fields,
  and a class attribute ``next_is_value``: whether ``_next`` returns the evaluation itself,
  so that the point evaluated next is always the last evaluation and is carried once.
  """

  next_is_value: ClassVar[bool] = False
  # Stops each sample once it meets the tolerance (or the step cap).
  stops_at_tolerance: ClassVar[bool] = True

  def _init(self, z0: Any, batch: int) -> Any:
    raise NotImplementedError

  def _next(self, k: jax.Array, x: Any, fx: Any, accel: Any) -> tuple[Any, Any]:
    """The next point to evaluate from x, its evaluation fx = T(x), and the state."""
    raise NotImplementedError

  def _best(self, best: Any, active: jax.Array, x: Any, fx: Any, rel: jax.Array,
            lazy: bool) -> Any:
    """The best-so-far state after x's evaluation fx with residual rel (best_so_far only).

    ``lazy``: one sample whose next point is its evaluation (Picard in the early-exit
    loop). Its best evaluation is then usually x itself, the last one; it is copied
    aside only when a worse evaluation is about to replace x, instead of every step.
    """
    if not self.best_so_far:
      return ()
    if not lazy:
      value, residual = best
      better = active & (rel < residual)  # False for NaN
      return _select(better, fx, value), jnp.where(better, rel, residual)
    value, residual, is_x = best
    better = active & (rel < residual)
    value = jax.lax.cond(is_x[0] & ~better[0], lambda: x, lambda: value)
    return value, jnp.where(better, rel, residual), better

  def _step(self, fn, args, n: int, all_active: bool) -> Callable[[_LoopState], _LoopState]:
    """One masked step; ``all_active``: every sample is known to be active whenever it runs
    (a while loop over one sample), so the iterates need no freezing."""
    def step(s: _LoopState) -> _LoopState:
      fx = fn(s.x, args)
      # The test is a diagnostic: never differentiated, so a masked scan's backward pass
      # does not carry it.
      rel, met = _residual_test(jax.lax.stop_gradient(fx), jax.lax.stop_gradient(s.x),
                                self.rtol, self.atol, n)
      finite = jnp.isfinite(rel)
      x_next, accel = self._next(s.step, s.x, fx, s.accel)
      finished = s.active & (met | ~finite)
      code = jnp.where(finite, RESULTS.successful, RESULTS.nonfinite).astype(jnp.int32)
      # Freezing a finished sample rewrites whole feature maps, so it is done only where
      # some sample can be inactive; the (B,) diagnostics keep their masks either way.
      if all_active:
        def freeze(new, old):
          return new
      else:
        def freeze(new, old):
          return _select(s.active, new, old)
      return _LoopState(
          step=s.step + 1,
          x=freeze(x_next, s.x),
          value=() if self.next_is_value else freeze(fx, s.value),
          active=s.active & ~finished,
          status=jnp.where(finished, code, s.status),
          num_steps=s.num_steps + s.active.astype(jnp.int32),
          residual=jnp.where(s.active, rel, s.residual),
          history=s.history.at[:, s.step].set(jnp.where(s.active, rel, jnp.nan)),
          # A finished sample's x no longer moves, so its (unused) state needs no freezing.
          accel=accel,
          best=self._best(s.best, s.active, s.x, fx, rel,
                          lazy=all_active and self.next_is_value))
    return step

  def _run(self, fn, z0, args, max_steps: int, differentiable: bool) -> _Outcome:
    if max_steps == 0:
      return _no_steps(z0)
    batch = _batch_size(z0)
    # The early-exit loop runs while any sample is active: with one sample, only while it
    # is. The masked scan runs every step, so there a finished sample must be frozen.
    all_active = not differentiable and batch == 1
    lazy_best = all_active and self.next_is_value
    best = ()
    if self.best_so_far:
      # Only a best-so-far solve pays for carrying a second copy of the iterate.
      best = (z0, jnp.full((batch,), jnp.inf, jnp.float32))
      best += (jnp.zeros((batch,), bool),) if lazy_best else ()
    init = _LoopState(
        step=jnp.int32(0), x=z0, value=() if self.next_is_value else z0,
        active=jnp.ones((batch,), bool),
        status=jnp.full((batch,), RESULTS.max_steps_reached, jnp.int32),
        num_steps=jnp.zeros((batch,), jnp.int32),
        residual=jnp.full((batch,), jnp.nan, jnp.float32),
        history=jnp.full((batch, max_steps), jnp.nan, jnp.float32),
        accel=self._init(z0, batch), best=best)
    step = self._step(fn, args, _sample_size(z0), all_active)
    if differentiable:
      final, _ = jax.lax.scan(lambda s, _: (step(s), None), init, None, length=max_steps,
                              unroll=resolve_unroll(self.unroll, max_steps))
    else:
      final = jax.lax.while_loop(lambda s: (s.step < max_steps) & jnp.any(s.active), step, init)
    # A frozen sample's x is its last evaluation when the next point is the evaluation.
    value, residual = (final.x if self.next_is_value else final.value), final.residual
    if self.best_so_far:
      # A solve that missed the tolerance answers with its best evaluation instead.
      best_value, best_residual = final.best[:2]
      if lazy_best:
        best_value = _select(final.best[2], final.x, best_value)
      use_best = (final.status != RESULTS.successful) & jnp.isfinite(best_residual)
      value = _select(use_best, best_value, value)
      residual = jnp.where(use_best, best_residual, residual)
    return _Outcome(value, final.status, final.num_steps, residual, final.history)


@dataclasses.dataclass(frozen=True)
class Picard(_Iterative):
  """z <- T(z) until ``rms(T(z) - z) <= atol + rtol * rms(T(z))`` or ``max_steps``.

  Attributes:
    rtol, atol: the stopping test (module docstring).
    unroll: ``lax.scan`` unroll of the masked scan run under `Backprop` differentiation.
    best_so_far: a sample that misses the tolerance answers with its evaluation of
      lowest residual rather than its last one (module docstring, "Status").
  """
  name: ClassVar[str] = "picard"
  next_is_value: ClassVar[bool] = True
  rtol: float = 1e-3
  atol: float = 0.0
  unroll: Unroll = "auto"
  best_so_far: bool = False

  def __post_init__(self) -> None:
    _check_nonnegative("Picard", rtol=self.rtol, atol=self.atol)
    _check_unroll("Picard", self)

  @classmethod
  def from_config(cls, cfg: Any) -> Picard:
    return cls(rtol=cfg.rtol, atol=cfg.atol, unroll=cfg.unroll, best_so_far=cfg.best_so_far)

  def _init(self, z0, batch):
    return ()

  def _next(self, k, x, fx, accel):
    return fx, accel


class _AndersonState(NamedTuple):
  """Anderson's ring buffer of the last m pairs (slot k % m holds step k)."""
  f: Any           # leaves (m, B, ...): evaluations F_i = T(x_i)
  g: Any           # leaves (m, B, ...): residuals G_i = F_i - x_i
  gram: jax.Array  # (B, m, m) float32: <G_i, G_j> per sample


@dataclasses.dataclass(frozen=True)
class Anderson(_Iterative):
  """Anderson acceleration (type II) with the stopping test of `Picard`.

  Attributes:
    m: history length (>= 1; 1 is damped Picard).
    beta: damping/mixing parameter in (0, 1]; 1 mixes the map values only.
    reg: relative Tikhonov regulariser of the m x m least squares (>= 0).
    rtol, atol: the stopping test (module docstring).
    unroll: ``lax.scan`` unroll of the masked scan run under `Backprop` differentiation.
    best_so_far: as for `Picard`.
  """
  name: ClassVar[str] = "anderson"
  m: int = 5
  beta: float = 1.0
  reg: float = 1e-5
  rtol: float = 1e-3
  atol: float = 0.0
  unroll: Unroll = "auto"
  best_so_far: bool = False

  def __post_init__(self) -> None:
    if not is_integer(self.m, 1):
      raise ValueError(f"Anderson.m must be an integer >= 1, got {self.m!r}")
    object.__setattr__(self, "m", operator.index(self.m))  # A plain int: hashable, static.
    if not 0.0 < self.beta <= 1.0:
      raise ValueError(f"Anderson.beta must lie in (0, 1], got {self.beta}")
    _check_nonnegative("Anderson", reg=self.reg, rtol=self.rtol, atol=self.atol)
    _check_unroll("Anderson", self)

  @classmethod
  def from_config(cls, cfg: Any) -> Anderson:
    return cls(m=cfg.anderson_m, beta=cfg.anderson_beta, reg=cfg.anderson_reg, rtol=cfg.rtol,
               atol=cfg.atol, unroll=cfg.unroll, best_so_far=cfg.best_so_far)

  def _init(self, z0, batch):
    stacked = jax.tree.map(lambda x: jnp.zeros((self.m,) + x.shape, x.dtype), z0)
    return _AndersonState(stacked, stacked, jnp.zeros((batch, self.m, self.m), jnp.float32))

  def _next(self, k, x, fx, accel: _AndersonState):
    m = self.m
    slot = k % m
    g = jax.tree.map(jnp.subtract, fx, x)
    hist_f = jax.tree.map(lambda h, v: h.at[slot].set(v), accel.f, fx)
    hist_g = jax.tree.map(lambda h, v: h.at[slot].set(v), accel.g, g)
    # Only the new slot's row and column of the Gram matrix change.
    row = jnp.stack([_sample_dot(g, jax.tree.map(lambda h: h[i], hist_g)) for i in range(m)],
                    axis=1)
    gram = accel.gram.at[:, slot, :].set(row).at[:, :, slot].set(row)
    valid = jnp.arange(m) < jnp.minimum(k + 1, m)
    # A residual at float32 rounding (relative, below 8 eps): the stored residuals are
    # noise, and so is the derivative of the weights fitted to them.
    quiet = row[:, slot] <= (8 * jnp.finfo(jnp.float32).eps) ** 2 * _sample_dot(fx, fx)
    return (self._mix(hist_f, hist_g, gram, valid, slot, quiet),
            _AndersonState(hist_f, hist_g, gram))

  def _mix(self, hist_f, hist_g, gram, valid, newest, quiet=None):
    """x_{k+1} from the stored (F_i, G_i) pairs; gram (B, m, m), valid (m,), ``newest``
    the slot of the latest pair (the history is a ring); where ``quiet`` (B,) the
    weights are differentiated as constants."""
    m = self.m
    both = valid[:, None] & valid[None, :]
    diag = jnp.diagonal(gram, axis1=1, axis2=2)
    scale = jnp.sum(jnp.where(valid, diag, 0.0), axis=1) / jnp.maximum(jnp.sum(valid), 1)
    # Residuals that are all exactly zero (a sample solved exactly) scale by 1: dividing by
    # a tiny floor instead would overflow the gradient (0 / tiny^2).
    scale = jnp.where(scale > jnp.finfo(jnp.float32).tiny, scale, 1.0)[:, None, None]
    # Unused slots become identity rows with a zero right-hand side: their weight is 0.
    h = jnp.where(both, gram / scale, 0.0) + jnp.eye(m) * jnp.where(valid, self.reg, 1.0)
    rhs = jnp.broadcast_to(valid.astype(jnp.float32), h.shape[:2])[..., None]

    def weights(h):
      a = jnp.linalg.solve(h, rhs)[..., 0]
      return a / jnp.sum(a, axis=1, keepdims=True)
    # A breakdown of the small solve (a singular h, as when a finished sample's stored
    # residuals coincide without `reg`) falls back to plain Picard on the newest pair. It
    # is found first, and the solve differentiated is then one of a harmless h there:
    # NaN weights masked by a where still give NaN gradients (0 * NaN).
    ok = jnp.all(jnp.isfinite(jax.lax.stop_gradient(weights(h))), axis=1, keepdims=True)
    alpha = weights(jnp.where(ok[..., None], h, jnp.eye(m)))
    fallback = jax.nn.one_hot(newest, m, dtype=jnp.float32)
    alpha = jnp.where(ok, alpha, fallback)
    if quiet is not None:  # Differentiating an ill-posed fit to noise would amplify it.
      alpha = jnp.where(quiet[:, None], jax.lax.stop_gradient(alpha), alpha)
    beta = self.beta

    def mix(f, g):
      flat = (f.astype(jnp.float32) - (1.0 - beta) * g.astype(jnp.float32))
      out = jnp.einsum("bi,ib...->b...", alpha, flat, precision=_HIGHEST)
      return out.astype(f.dtype)
    return jax.tree.map(mix, hist_f, hist_g)


Solver = Union[Unrolled, Picard, Anderson]
# name -> class: what ModelConfig.solver may say. A new solver is a class with a `name`,
# `stops_at_tolerance`, `from_config` and `_run`, listed here.
SOLVER_CLASSES = {cls.name: cls for cls in (Unrolled, Picard, Anderson)}
SOLVERS = tuple(SOLVER_CLASSES)


def stops_at_tolerance(solver: str) -> bool:
  """Whether the solver named ``solver`` (`ModelConfig.solver`) solves to a tolerance,
  so its steps, residuals and statuses say how each solve went (what the tools report),
  rather than running a fixed number of steps."""
  return SOLVER_CLASSES[solver].stops_at_tolerance


# ------------------------------------------------------------------ adjoints


def _closed_map(fn, z0, args):
  """``fn`` with the arrays it closes over hoisted into explicit inputs ``(args, consts)``.

  Custom JVP/VJP rules only differentiate their explicit inputs, so closed-over
  tracers must become inputs to receive tangents and cotangents.
  """
  closed, consts = jax.closure_convert(fn, z0, args)

  def t_map(z, inputs):
    return closed(z, inputs[0], *inputs[1])

  return t_map, consts


@dataclasses.dataclass(frozen=True)
class Backprop:
  """Gradients through the iterations (module docstring, "Adjoints")."""
  name: ClassVar[str] = "backprop"

  @classmethod
  def from_config(cls, cfg: Any) -> Backprop:
    return cls()

  def _apply(self, solver: Solver, fn, z0, args, max_steps: int) -> _Outcome:
    if isinstance(solver, Unrolled):
      return solver._run(fn, z0, args, max_steps, differentiable=True)
    # Picard/Anderson: the primal is the early-exit while loop; the custom JVP rule
    # differentiates the equivalent fixed-length masked scan, which JAX can linearise
    # and transpose. Inference pays only for the steps taken, gradients for max_steps.
    t_map, consts = _closed_map(fn, z0, args)

    @jax.custom_jvp
    def solve(z0, inputs):
      return solver._run(t_map, z0, inputs, max_steps, differentiable=False)

    @solve.defjvp
    def solve_jvp(primals, tangents):
      return jax.jvp(lambda z, i: solver._run(t_map, z, i, max_steps, differentiable=True),
                     primals, tangents)

    return solve(z0, (args, consts))


@dataclasses.dataclass(frozen=True)
class Implicit:
  """Gradients by the implicit function theorem (module docstring, "Adjoints").

  The adjoint fixed point is solved with the forward's solver family.

  Attributes:
    max_steps: step cap of the adjoint solve; None: the forward's ``max_steps``.
    rtol, atol: its stopping test; None: the forward solver's.
  """
  name: ClassVar[str] = "implicit"
  max_steps: Optional[int] = None
  rtol: Optional[float] = None
  atol: Optional[float] = None

  def __post_init__(self) -> None:
    _check_steps("Implicit.max_steps", self.max_steps)
    if self.max_steps is not None:  # A plain int: hashable, static.
      object.__setattr__(self, "max_steps", operator.index(self.max_steps))
    _check_nonnegative("Implicit", none_allowed=True, rtol=self.rtol, atol=self.atol)

  @classmethod
  def from_config(cls, cfg: Any) -> Implicit:
    # adjoint_max_steps = 0: the adjoint solve gets each block's own step cap.
    return cls(max_steps=cfg.adjoint_max_steps or None, rtol=cfg.adjoint_rtol,
               atol=cfg.adjoint_atol)

  def adjoint_solver(self, solver: Solver) -> Solver:
    """The solver of the adjoint fixed point: ``solver`` with this object's tolerances."""
    return dataclasses.replace(
        solver, rtol=solver.rtol if self.rtol is None else float(self.rtol),
        atol=solver.atol if self.atol is None else float(self.atol))

  def _apply(self, solver: Solver, fn, z0, args, max_steps: int) -> _Outcome:
    adjoint = self.adjoint_solver(solver)
    adjoint_steps = max_steps if self.max_steps is None else int(self.max_steps)
    t_map, consts = _closed_map(fn, z0, args)

    @jax.custom_vjp
    def solve(z0, inputs):
      return solver._run(t_map, z0, inputs, max_steps, differentiable=False)

    def solve_fwd(z0, inputs):
      out = solve(z0, inputs)
      return out, (out.value, inputs)

    def solve_bwd(saved, cotangents):
      z_star, inputs = saved
      z_bar = cotangents.value
      _, vjp = jax.vjp(t_map, z_star, inputs)

      def adjoint_map(u, _):
        return jax.tree.map(jnp.add, z_bar, vjp(u)[0])

      u = adjoint._run(adjoint_map, z_bar, None, adjoint_steps, differentiable=False).value
      return jax.tree.map(jnp.zeros_like, z_star), vjp(u)[1]

    solve.defvjp(solve_fwd, solve_bwd)
    return solve(z0, (args, consts))


@dataclasses.dataclass(frozen=True)
class Phantom:
  """Phantom (Jacobian-free) gradients: k damped steps at the solution (module docstring).

  Attributes:
    steps: k, the differentiated steps z <- (1 - damping) z + damping T(z) from z*
      (>= 1; ``steps=1, damping=1`` is the Jacobian-free backprop of Fung et al.).
    damping: tau in (0, 1].
  """
  name: ClassVar[str] = "phantom"
  steps: int = 1
  damping: float = 1.0

  def __post_init__(self) -> None:
    if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
      raise ValueError(f"Phantom.steps must be an integer >= 1, got {self.steps}")
    if not 0.0 < self.damping <= 1.0:
      raise ValueError(f"Phantom.damping must lie in (0, 1], got {self.damping}")

  @classmethod
  def from_config(cls, cfg: Any) -> Phantom:
    return cls(steps=cfg.phantom_steps, damping=cfg.phantom_damping)

  def _apply(self, solver: Solver, fn, z0, args, max_steps: int) -> _Outcome:
    t_map, consts = _closed_map(fn, z0, args)
    inputs = (args, consts)
    # The solve sees no tangents, so its early-exit while loop is never differentiated.
    out = solver._run(t_map, jax.lax.stop_gradient(z0), jax.lax.stop_gradient(inputs),
                      max_steps, differentiable=False)
    z_star = jax.lax.stop_gradient(out.value)
    tau = self.damping
    z = z_star
    for _ in range(int(self.steps)):
      z = jax.tree.map(lambda a, b: (1.0 - tau) * a + tau * b, z, t_map(z, inputs))
    # The value is the solver's answer; only the gradient is the phantom steps'.
    return out._replace(value=jax.tree.map(_answer_with_tangent_of, z_star, z))


@jax.custom_jvp
def _answer_with_tangent_of(answer: jax.Array, surrogate: jax.Array) -> jax.Array:
  """``answer``, differentiated as ``surrogate``. Unlike answer + (s - stop_gradient(s)),
  the value stays the answer where the surrogate is not finite (a best-so-far answer
  whose next map evaluation overflows)."""
  del surrogate
  return answer


@_answer_with_tangent_of.defjvp
def _answer_with_tangent_of_jvp(primals, tangents):
  return primals[0], tangents[1]


Adjoint = Union[Backprop, Implicit, Phantom]
# name -> class: what ModelConfig.backward may say (a new adjoint: a class with `name`,
# `from_config` and `_apply`, listed here).
ADJOINT_CLASSES = {cls.name: cls for cls in (Backprop, Implicit, Phantom)}
BACKWARDS = tuple(ADJOINT_CLASSES)


# ------------------------------------------------------------------ entry points


def fixed_point(fn: Callable[[Any, Any], Any], solver: Solver, z0: Any, args: Any = None, *,
                max_steps: int, adjoint: Adjoint = Backprop(),
                per_sample: bool = False) -> FixedPointResult:
  """Solves z = fn(z, args) from ``z0``; see the module docstring for the maths.

  Args:
    fn: the map T, ``fn(z, args) -> z`` with the same pytree structure as ``z0``.
    solver: `Unrolled`, `Picard` or `Anderson`.
    z0: starting point.
    args: pytree of inputs of ``fn`` (differentiated through).
    max_steps: map evaluations (`Unrolled`: exactly this many; otherwise the cap).
    adjoint: `Backprop` (through the steps), `Implicit` (the implicit function
      theorem) or `Phantom` (damped steps at the solution).
    per_sample: the leading axis of every leaf indexes independent problems.

  Returns:
    `FixedPointResult`; with ``per_sample`` its diagnostics have a leading batch axis.
  """
  # Type names only: a misplaced array (the old fixed_point(fn, z0, args) order) would
  # otherwise print whole.
  if not isinstance(solver, tuple(SOLVER_CLASSES.values())):
    raise ValueError(f"unknown solver of type {type(solver).__name__}; the call is "
                     "fixed_point(fn, solver, z0, args, ...) with solver one of "
                     f"{', '.join(c.__name__ for c in SOLVER_CLASSES.values())} "
                     f"(from_config builds one from {SOLVERS})")
  if not isinstance(adjoint, tuple(ADJOINT_CLASSES.values())):
    raise ValueError(f"unknown adjoint of type {type(adjoint).__name__}; pass one of "
                     f"{', '.join(c.__name__ + '()' for c in ADJOINT_CLASSES.values())} "
                     f"(from_config builds one from {BACKWARDS})")
  _check_steps("max_steps", max_steps, optional=False)
  if per_sample:
    leaves = jax.tree.leaves(z0)
    if not leaves or any(np.ndim(x) < 1 or np.shape(x)[0] != np.shape(leaves[0])[0]
                         for x in leaves):
      raise ValueError("per_sample=True needs every leaf of z0 to share a leading batch axis")

  if per_sample:
    map_b, z0_b = fn, z0
  else:  # One problem: give every leaf a batch axis of 1 and strip it afterwards.
    def map_b(z, a):
      return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], z), a))
    z0_b = jax.tree.map(lambda x: jnp.asarray(x)[None], z0)

  if int(max_steps) == 0:  # No step taken: the answer is z0, differentiated as itself.
    out = solver._run(map_b, z0_b, args, 0, differentiable=True)
  else:
    out = adjoint._apply(solver, map_b, z0_b, args, int(max_steps))
  if not per_sample:
    out = _Outcome(jax.tree.map(lambda x: x[0], out.value),
                   *(field[0] for field in out[1:]))
  return FixedPointResult(value=out.value, status=out.status, num_steps=out.num_steps,
                          residual=out.residual, residual_history=out.history)


def from_config(cfg: Any) -> tuple[Solver, Adjoint]:
  """The solver and adjoint objects a `ModelConfig`'s ``solver`` and ``backward`` name.

  Each class reads its own settings from the config (its ``from_config``).
  """
  if cfg.solver not in SOLVER_CLASSES:
    raise ValueError(f"unknown solver {cfg.solver!r}; choose one of {SOLVERS}")
  if cfg.backward not in ADJOINT_CLASSES:
    raise ValueError(f"unknown backward {cfg.backward!r}; choose one of {BACKWARDS}")
  return (SOLVER_CLASSES[cfg.solver].from_config(cfg),
          ADJOINT_CLASSES[cfg.backward].from_config(cfg))
