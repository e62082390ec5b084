"""The contractivity penalty against dense Jacobians, and that it does its job."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import minet_jax
from minet_jax.stability import contractive, spectral
from minet_jax.core import fixed_point as fp
from minet_jax.core.model import IMBlock


def _tiny_block(gain=1.0):
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(4,), dilations=(1,))
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32) * gain
  return nnx.split(block)


@functools.partial(jax.jit, static_argnums=0)
def _jacobians(graphdef, state, g0, g):
  """Dense dT/dg of every sample, shape (batch, n, n)."""
  t_map, f_state = nnx.merge(graphdef, state).map_fn()

  def one(g0, g):
    return jax.jacfwd(lambda z: t_map(z.reshape(g.shape), (g0, f_state)).ravel())(g.ravel())
  return jax.vmap(one)(g0[:, None], g[:, None])


def _dense_norms(graphdef, state, g0, g):
  return np.linalg.norm(np.asarray(_jacobians(graphdef, state, g0, g), np.float64), 2,
                        axis=(1, 2))


def test_block_estimate_is_each_samples_spectral_norm():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) * jnp.asarray([1.0, 3.0])[:, None,
                                                                                None, None]
  block = nnx.merge(graphdef, state)
  g = block(g0)
  sigma = contractive.block_spectral_norm(block, g0, g, jax.random.key(1), num_iters=60)
  np.testing.assert_allclose(sigma, _dense_norms(graphdef, state, g0, g), rtol=1e-3)


def test_penalty_gradient_is_the_gradient_of_the_true_norm():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(2), (1, 4, 4, 3))
  g = nnx.merge(graphdef, state)(g0)

  def estimate(state):  # sigma^2 with the target at 0, so the hinge is active.
    blk = nnx.merge(graphdef, state)
    sigma = contractive.block_spectral_norm(blk, g0, g, jax.random.key(3), num_iters=80)
    return jnp.sum(jnp.square(sigma))

  grad = jax.jit(jax.grad(estimate))(state)
  true_norm = lambda s: _dense_norms(graphdef, s, g0, g)[0] ** 2  # noqa: E731
  _check_directional_derivative(grad, true_norm, state, jax.random.key(4))


def _check_directional_derivative(grad, fn, state, key, eps=1e-3):
  """``grad`` against central differences of ``fn`` along one random direction."""
  direction = jax.tree.map(lambda x: jax.random.normal(key, x.shape), state)
  fd = (float(fn(jax.tree.map(lambda x, d: x + eps * d, state, direction)))
        - float(fn(jax.tree.map(lambda x, d: x - eps * d, state, direction)))) / (2 * eps)
  analytic = sum(float(jnp.vdot(a, d)) for a, d in
                 zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  assert analytic == pytest.approx(fd, rel=2e-2)


def test_training_on_the_penalty_makes_picard_converge():
  graphdef, state = _tiny_block(gain=3.0)
  g0 = jax.random.normal(jax.random.key(5), (2, 6, 6, 3))
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(state)

  @jax.jit
  def step(state, opt_state, key):
    def loss(state):
      blk = nnx.merge(graphdef, state)
      k1, k2 = jax.random.split(key)
      sigma = contractive.block_spectral_norm(blk, g0, contractive.random_iterate(blk, g0, k1),
                                              k2, num_iters=4)
      return jnp.mean(jnp.square(jax.nn.relu(sigma - 0.8)))
    updates, opt_state = optimizer.update(jax.grad(loss)(state), opt_state)
    return optax.apply_updates(state, updates), opt_state

  @jax.jit
  def picard(state):
    t_map, f_state = nnx.merge(graphdef, state).map_fn()
    return fp.fixed_point(t_map, fp.Picard(rtol=1e-5), g0, (g0, f_state), max_steps=200,
                          per_sample=True)

  before = picard(state)
  for i in range(60):
    state, opt_state = step(state, opt_state, jax.random.key(i))
  after = picard(state)
  assert float(jnp.min(before.residual)) > 0.1  # Picard cycles on the untrained block ...
  assert float(jnp.max(after.residual)) <= 1e-5  # ... and converges after the penalty.
  # Theorem 1 at the fixed point (the 4-step norm estimate is a lower bound, so the
  # norm itself may still exceed 1 where the radius does not).
  jacobians = np.asarray(_jacobians(graphdef, state, g0, after.value), np.float64)
  radii = np.max(np.abs(np.linalg.eigvals(jacobians)), axis=1)
  assert np.all(radii < 1.0), radii


def test_penalty_inputs_agree_and_weight_zero_is_free(random_params):
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(3, 3), dilations=(1, 2),
                              contractive_target=0.0, contractive_iters=3)
  params = random_params(cfg)
  images = jax.random.uniform(jax.random.key(6), (2, 8, 6, 3))
  key = jax.random.key(7)
  model = minet_jax.model_from_params(params)
  penalty = jax.jit(lambda p, x, k: contractive.penalty(p, x, key=k))
  from_images = penalty(params, images, key)
  from_batch = penalty(params, {"hazy": images, "clear": images}, key)
  assert float(from_images) > 0
  np.testing.assert_allclose(from_batch, from_images, rtol=1e-6)
  # Operating points from the diagnostics equal the blocks' outputs.
  _, results = model.forward_rgb_with_diagnostics(images)
  outputs = contractive.operating_points(model, images)
  np.testing.assert_allclose(outputs[1][0], results[0].value, rtol=1e-6)
  np.testing.assert_allclose(outputs[1][1], results[1].value, rtol=1e-6)
  at_points = jax.jit(lambda p, x, k: contractive.penalty_at_points(p, x, key=k))
  from_points = at_points(params, outputs, key)
  assert float(from_points) > 0
  assert float(contractive.weighted_penalty(params, images, key=key)) == 0.0
  with pytest.raises(ValueError, match="even H and W"):
    contractive.penalty(params, images[:, :7], key=key)
  with pytest.raises(ValueError, match="operating points"):
    contractive.penalty_at_points(params, [(images, images)], key=key)
  with pytest.raises(TypeError, match="MINet or minet_jax.Params"):
    contractive.penalty({"weights": 1}, images, key=key)
  # Random iterates are one-stage blocks' points; a config that asks for the solutions
  # is not given them in silence.
  two_stage = params.replace_config(stages=(1, 2), stage_fraction=(1.0, 0.5))
  with pytest.raises(ValueError, match=r"block\(s\) \[2\] have two stages"):
    contractive.penalty(two_stage, images, key=key)
  assert float(contractive.penalty(two_stage, images, key=key, blocks=[0])) > 0
  at_solution = params.replace_config(contractive_point="solution", contractive_weight=1.0)
  with pytest.raises(ValueError, match="contractive_point is 'solution'"):
    contractive.weighted_penalty(at_solution, images, key=key)


def test_per_block_targets_hinge_each_block_at_its_own_level(random_params):
  # One image, so each block's batch mean is its one sample: with targets (a, b) the
  # penalty is max(0, sigma_1 - a)^2 + max(0, sigma_2 - b)^2 for the sigmas it reports.
  # (The architecture of the test above: its initialisation is made once.)
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(3, 3), dilations=(1, 2),
                              contractive_target=0.0, contractive_iters=3)
  params = random_params(cfg)
  images = jax.random.uniform(jax.random.key(16), (1, 8, 6, 3))
  points = contractive.operating_points(minet_jax.model_from_params(params), images)
  key = jax.random.key(17)
  _, sigmas = contractive.penalty_at_points(params, points, key=key, per_block=True)
  s1, s2 = (float(v) for v in sigmas)
  assert s1 > 0 and s2 > 0
  for targets, expected in [((s1 / 2, s2 + 1.0), (s1 / 2) ** 2),
                            ((s1 / 2, s2 / 4), (s1 / 2) ** 2 + (3 * s2 / 4) ** 2)]:
    got = contractive.penalty_at_points(params, points, key=key, target=targets)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # The config's field is the default target, read the same way.
  configured = params.replace_config(contractive_target=targets)
  np.testing.assert_allclose(contractive.penalty_at_points(configured, points, key=key),
                             got, rtol=1e-6)
  with pytest.raises(ValueError, match="one entry per IM-block"):
    contractive.penalty_at_points(params, points, key=key, target=(0.5, 0.5, 0.5))


def test_frobenius_estimate_is_hutchinsons_on_the_dense_jacobian():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(8), (2, 5, 5, 3)) * jnp.asarray([1.0, 3.0])[:, None,
                                                                                None, None]
  block = nnx.merge(graphdef, state)
  g = block(g0)
  jac = np.asarray(_jacobians(graphdef, state, g0, g), np.float64)  # (2, n, n)
  n = jac.shape[1]
  key, probes = jax.random.key(9), 3
  estimate = contractive.block_frobenius(block, g0, g, key, probes)
  # The same probe vectors through the dense Jacobian: the estimator's exact value ...
  vs = [np.asarray(jax.random.normal(k, g.shape), np.float64).reshape(2, n)
        for k in jax.random.split(key, probes)]
  dense = np.mean([np.sum(np.einsum("bij,bj->bi", jac, v) ** 2, axis=1) for v in vs], 0) / n
  np.testing.assert_allclose(estimate, dense, rtol=1e-4)
  # ... and with many probes, the mean squared singular value ||J||_F^2 / n it estimates.
  many = contractive.block_frobenius(block, g0, g, jax.random.key(10), 400)
  np.testing.assert_allclose(many, np.sum(jac ** 2, axis=(1, 2)) / n, rtol=0.15)


def test_frobenius_penalty_gradient_matches_finite_differences():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(11), (1, 4, 4, 3))
  g = nnx.merge(graphdef, state)(g0)
  key = jax.random.key(12)

  def penalty(state):
    block = nnx.merge(graphdef, state)
    term, _ = contractive.block_term(block, g0, g, key, kind="frobenius", num_iters=2,
                                     target=0.0)
    return term

  grad = jax.jit(jax.grad(penalty))(state)
  _check_directional_derivative(grad, jax.jit(penalty), state, jax.random.key(13))


def test_radius_estimate_finds_a_real_dominant_eigenvalue_and_nears_a_complex_pair():
  graphdef, state = _tiny_block(gain=2.0)
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3))
  block = nnx.merge(graphdef, state)
  g = block(g0)
  jac = np.asarray(_jacobians(graphdef, state, g0, g), np.float64)
  eig = np.linalg.eigvals(jac)
  radii = np.max(np.abs(eig), axis=1)
  estimate = np.asarray(contractive.block_radius(block, g0, g, jax.random.key(15), 300))
  top = [e[np.argsort(-np.abs(e))] for e in eig]
  # Sample 0: a real dominant eigenvalue (-1.15, a Picard 2-cycle), found exactly;
  # sample 1: a complex pair, where ||J v|| rotates with v and only comes near rho.
  assert abs(top[0][0].imag) < 1e-9 and abs(top[0][1]) < 0.9 * radii[0]
  assert estimate[0] == pytest.approx(radii[0], rel=1e-3)
  assert abs(top[1][0].imag) > 0.1
  assert estimate[1] == pytest.approx(radii[1], rel=0.3)
  assert np.all(estimate <= _dense_norms(graphdef, state, g0, g))


def test_the_norms_gradient_is_zero_at_a_zero_vector_and_x_over_its_norm_elsewhere():
  # d||x|| = x / ||x|| is 0 / 0 at x = 0 (J v = 0 for a nilpotent or zero Jacobian).
  g = jax.random.normal(jax.random.key(3), (4, 4, 3))
  x = jnp.stack([jnp.zeros_like(g), g])
  grad = jax.grad(lambda x: spectral.norm(x, per_sample=True).sum())(x)
  np.testing.assert_array_equal(grad[0], 0.0)
  np.testing.assert_allclose(grad[1], g / jnp.linalg.norm(g), rtol=1e-6)
  np.testing.assert_array_equal(jax.grad(spectral.norm)(jnp.zeros(5)), 0.0)
  # NaN is not zero: a diverged vector's norm stays NaN.
  assert np.isnan(spectral.norm(x.at[0, 0, 0, 0].set(jnp.nan), per_sample=True)[0])
  assert float(spectral.norm(x)) == pytest.approx(float(jnp.linalg.norm(g)), rel=1e-6)


def _dense_radius(graphdef, state, g0, g, sample):
  jac = np.asarray(_jacobians(graphdef, state, g0, g), np.float64)[sample]
  return np.max(np.abs(np.linalg.eigvals(jac)))


def test_exact_radius_and_its_gradient_are_the_dominant_eigenvalues():
  # The tiny block of the test above: sample 0 has a real dominant eigenvalue (-1.15),
  # sample 1 a complex pair (0.87). The two-sided estimate finds both radii, and its
  # gradient is d rho by central differences of the dense eigenvalues, where that of
  # the one-sided ||J v|| (`block_radius`) is off by 12 % and 58 % on this non-normal J.
  graphdef, state = _tiny_block(gain=2.0)
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3))
  block = nnx.merge(graphdef, state)
  g = block(g0)
  radii = [_dense_radius(graphdef, state, g0, g, i) for i in range(2)]
  estimate = contractive.block_radius_exact(block, g0, g, jax.random.key(15), 200)
  np.testing.assert_allclose(estimate, radii, rtol=1e-5)
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(4), x.shape), state)

  def slope(fn, sample):
    grad = jax.jit(jax.grad(lambda s: fn(nnx.merge(graphdef, s), g0, g, jax.random.key(15),
                                         200)[sample]))(state)
    return sum(float(jnp.vdot(a, d)) for a, d in
               zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))

  for sample in range(2):
    eps = 1e-3
    fd = (_dense_radius(graphdef, jax.tree.map(lambda x, d: x + eps * d, state, direction),
                        g0, g, sample)
          - _dense_radius(graphdef, jax.tree.map(lambda x, d: x - eps * d, state, direction),
                          g0, g, sample)) / (2 * eps)
    assert slope(contractive.block_radius_exact, sample) == pytest.approx(fd, rel=1e-3)
    assert slope(contractive.block_radius, sample) != pytest.approx(fd, rel=0.1)


def _projected(a_matrix, right_start, left_start, iters):
  """`spectral.projected_radius` of the dense ``a_matrix`` from `power_pair`'s planes
  (a batch of one), differentiable with respect to ``a_matrix``."""
  frozen = jax.lax.stop_gradient(a_matrix)
  right = spectral.power_pair(lambda v: v @ frozen.T, right_start[None], num_iters=iters,
                              per_sample=True)
  left = spectral.power_pair(lambda w: w @ frozen, left_start[None], num_iters=iters,
                             per_sample=True)
  right, left = spectral.pair_planes(right, left, per_sample=True)
  radius, found = spectral.projected_radius(
      right, left, (right[0] @ a_matrix.T, right[1] @ a_matrix.T),
      (left[0] @ frozen, left[1] @ frozen), per_sample=True)
  return radius[0], found[0]


def _non_normal(spectrum):
  """A 30 x 30 S D S^-1 with its dominant eigenvalue lam (-1.2, or the pair 1.1
  exp(+-0.6i)) and, for it, x, y and d|lam|/dA = Re(conj(lam) y x^T / y^T x) / |lam|."""
  rng = np.random.default_rng(0)
  n = 30
  d = np.diag(np.concatenate([[0.0, 0.0], rng.uniform(-0.7, 0.7, n - 2)]))
  if spectrum == "real":
    d[0, 0], d[1, 1] = -1.2, 0.9
  else:
    d[:2, :2] = 1.1 * np.array([[np.cos(0.6), -np.sin(0.6)], [np.sin(0.6), np.cos(0.6)]])
  basis = np.eye(n) + 0.3 * rng.normal(size=(n, n))
  a_matrix = basis @ d @ np.linalg.inv(basis)
  values, right_vectors = np.linalg.eig(a_matrix)
  top = int(np.argmax(np.abs(values)))
  lam, x = values[top], right_vectors[:, top]
  left_values, left_vectors = np.linalg.eig(a_matrix.T)
  y = left_vectors[:, int(np.argmin(np.abs(left_values - lam)))]
  expected = np.real(np.conj(lam) * np.outer(y, x) / (y @ x)) / abs(lam)
  return a_matrix, lam, x, y, left_vectors, left_values, expected


@pytest.mark.parametrize("spectrum", ["real", "complex"])
def test_projection_gives_the_dominant_eigenvalue_and_its_derivative(spectrum):
  # A non-normal matrix whose dominant eigenvalue is real or a complex pair, the next
  # 0.9 (real) or at most 0.7. Converged planes (200 steps) give rho and d|lambda| (x, y
  # the right and left eigenvectors) to rounding.
  a_matrix, lam, x, y, _, _, expected = _non_normal(spectrum)
  rng = np.random.default_rng(1)
  n = len(x)
  start = jnp.asarray(rng.normal(size=n), jnp.float32)
  a32 = jnp.asarray(a_matrix, jnp.float32)
  (radius, found), grad = jax.value_and_grad(_projected, has_aux=True)(a32, start, start, 200)
  assert bool(found) and float(radius) == pytest.approx(abs(lam), rel=1e-4)
  np.testing.assert_allclose(np.asarray(grad), expected, atol=2e-3 * np.abs(expected).max())
  # Only the right plane converged (started at x), the left one two steps from noise:
  # lambda is an eigenvalue of the projection but its derivative is not J's; refused.
  right_start = jnp.asarray(np.real(x * np.exp(-1j * np.angle(x[0]))), jnp.float32)
  noise = jnp.asarray(rng.normal(size=n), jnp.float32)
  assert not bool(_projected(a32, right_start, noise, 2)[1])


def test_projection_keeps_the_left_plane_when_the_right_one_has_collapsed():
  # The right iteration started at x stays x (a plane of one vector, its second
  # vector rounding noise); the left one, three steps from y plus a tenth of the next
  # left eigenvector, still holds y only as a mix of its two vectors. The projection
  # borrows the left plane's second vector (`pair_planes`) and is exact.
  a_matrix, lam, x, y, left_vectors, left_values, expected = _non_normal("real")
  y2 = np.real(left_vectors[:, int(np.argmin(np.abs(left_values - 0.9)))])
  y = np.real(y)
  left_start = jnp.asarray(y / np.linalg.norm(y) + 0.1 * y2 / np.linalg.norm(y2), jnp.float32)
  (radius, found), grad = jax.value_and_grad(_projected, has_aux=True)(
      jnp.asarray(a_matrix, jnp.float32), jnp.asarray(np.real(x), jnp.float32), left_start, 3)
  assert bool(found) and float(radius) == pytest.approx(abs(lam), rel=1e-4)
  np.testing.assert_allclose(np.asarray(grad), expected, atol=2e-3 * np.abs(expected).max())


def test_exact_radius_falls_back_to_the_one_sided_estimate_before_its_planes_converge():
  # Four steps on the tiny block: neither sample's planes hold an eigenpair, and each
  # gets block_radius's estimate and gradient, from the same start.
  graphdef, state = _tiny_block(gain=2.0)
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3))
  g = nnx.merge(graphdef, state)(g0)

  def both(s):
    blk = nnx.merge(graphdef, s)
    exact, found = contractive.block_radius_exact(blk, g0, g, jax.random.key(15), 4,
                                                  with_found=True)
    return exact, found, contractive.block_radius(blk, g0, g, jax.random.key(15), 4)

  exact, found, one_sided = both(state)
  assert not np.any(found)
  np.testing.assert_allclose(exact, one_sided, rtol=1e-5)
  grads = [jax.grad(lambda s, i=i: both(s)[i].sum())(state) for i in (0, 2)]
  for a, b in zip(*(jax.tree.leaves(g) for g in grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_exact_radius_penalty_lowers_the_radius_and_refuses_orthogonal_planes():
  # As a penalty kind it lowers the radius it measures on the tiny block.
  graphdef, state = _tiny_block(gain=2.0)
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3))
  g = nnx.merge(graphdef, state)(g0)

  def loss(s):
    term, _ = contractive.block_term(nnx.merge(graphdef, s), g0, g, jax.random.key(15),
                                     kind="radius_exact", num_iters=30, target=0.5)
    return term

  tx = optax.adam(1e-2)
  opt = tx.init(state)
  before = [_dense_radius(graphdef, state, g0, g, i) for i in range(2)]

  @jax.jit
  def step(state, opt):
    updates, opt = tx.update(jax.grad(loss)(state), opt, state)
    return optax.apply_updates(state, updates), opt

  for _ in range(40):
    state, opt = step(state, opt)
  after = [_dense_radius(graphdef, state, g0, g, i) for i in range(2)]
  assert all(a < b - 0.1 for a, b in zip(after, before)), (before, after)
  # Orthogonal planes leave no projection: flagged, with a finite placeholder (for which
  # `block_radius_exact` puts the one-sided estimate).
  e = [jnp.eye(4)[i].reshape(1, 4) for i in range(4)]
  one = jnp.ones(1)
  radius, ok = spectral.projected_radius((e[0], e[1], one, one), (e[2], e[3], one, one),
                                         (e[0], e[1]), (e[2], e[3]), per_sample=True)
  assert not bool(ok[0]) and np.isfinite(radius).all()


def test_radius_from_a_kept_vector_continues_the_power_iteration():
  # 150 steps from a kept vector, then 150 more from the vector it returns, is the
  # 300-step estimate from the same start: training can spread the iteration over steps.
  graphdef, state = _tiny_block(gain=2.0)
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3))
  block = nnx.merge(graphdef, state)
  g = block(g0)
  v0 = spectral.unit(jax.random.normal(jax.random.key(15), g.shape), per_sample=True)
  whole, _ = contractive.block_radius_from(block, g0, g, v0, 300)
  _, half = contractive.block_radius_from(block, g0, g, v0, 150)
  resumed, _ = contractive.block_radius_from(block, g0, g, half, 150)
  np.testing.assert_allclose(resumed, whole, rtol=1e-5)
  # block_radius is the same iteration from the residual start: checked step by step
  # against the dense Jacobian.
  t_map, f_state = block.map_fn()
  start = np.asarray(contractive.residual_start(t_map(g, (g0, f_state)) - g,
                                                jax.random.normal(jax.random.key(15), g.shape)))
  jac = np.asarray(_jacobians(graphdef, state, g0, g), np.float64)
  v = start.reshape(2, -1).astype(np.float64)
  for _ in range(20):
    v = np.einsum("bij,bj->bi", jac, v)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
  dense = np.linalg.norm(np.einsum("bij,bj->bi", jac, v), axis=1)
  np.testing.assert_allclose(contractive.block_radius(block, g0, g, jax.random.key(15), 20),
                             dense, rtol=1e-4)


def test_radius_from_the_picard_residual_needs_few_steps():
  # At a Picard iterate (12 steps, not yet converged) the residual T(g) - g leans
  # towards J's dominant mode, so two power steps from it find a real dominant
  # eigenvalue that two steps from random noise miss by a quarter.
  graphdef, state = _tiny_block(gain=0.3)
  g0 = jax.random.normal(jax.random.key(20), (2, 6, 6, 3))
  block = nnx.merge(graphdef, state)
  t_map, f_state = block.map_fn()
  g = fp.fixed_point(t_map, fp.Unrolled(unroll=1), g0, (g0, f_state), max_steps=12,
                     per_sample=True).value
  eig = np.linalg.eigvals(np.asarray(_jacobians(graphdef, state, g0, g), np.float64))[1]
  top = eig[np.argsort(-np.abs(eig))]
  assert abs(top[0].imag) < 1e-9 and abs(top[1]) < 0.7 * abs(top[0])  # real, dominant
  key = jax.random.key(21)
  from_residual = float(contractive.block_radius(block, g0, g, key, 2)[1])
  from_noise = float(contractive.block_radius_from(
      block, g0, g, jax.random.normal(key, g.shape), 2)[0][1])
  assert from_residual == pytest.approx(abs(top[0]), rel=1e-2)
  assert from_noise < 0.8 * abs(top[0])
  # A residual of zero (an exact fixed point) falls back to the noise.
  zero = contractive.residual_start(jnp.zeros_like(g), jax.random.normal(key, g.shape))
  np.testing.assert_allclose(zero, spectral.unit(jax.random.normal(key, g.shape),
                                                 per_sample=True), rtol=1e-6)


def test_fixed_point_mismatch_trains_a_block_to_the_teachers_fixed_point():
  """A student block trained on the mismatch alone solves to the teacher's output."""
  teacher_def, teacher_state = _tiny_block(gain=0.5)
  student_def, student_state = _tiny_block(gain=0.2)
  student_state = jax.tree.map(lambda x: x * 0.9, student_state)
  g0 = jax.random.normal(jax.random.key(16), (2, 5, 5, 3))

  def solve(graphdef, state):
    t_map, f_state = nnx.merge(graphdef, state).map_fn()
    return fp.fixed_point(t_map, fp.Picard(rtol=1e-6), g0, (g0, f_state), max_steps=300,
                          per_sample=True).value

  target = jax.jit(solve, static_argnums=0)(teacher_def, teacher_state)
  block = nnx.merge(student_def, student_state)
  t_map, f_state = block.map_fn()
  mismatch = contractive.fixed_point_mismatch(block, g0, target)
  expected = (np.sum(np.square(np.asarray(t_map(target, (g0, f_state)) - target)), (1, 2, 3))
              / np.sum(np.square(np.asarray(target - g0)), (1, 2, 3)))
  np.testing.assert_allclose(mismatch, expected, rtol=1e-5)
  teacher = nnx.merge(teacher_def, teacher_state)
  assert float(jnp.max(contractive.fixed_point_mismatch(teacher, g0, target))) < 1e-9

  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(student_state)

  @jax.jit
  def step(state, opt_state):
    loss = lambda s: jnp.mean(contractive.fixed_point_mismatch(  # noqa: E731
        nnx.merge(student_def, s), g0, target))
    updates, opt_state = optimizer.update(jax.grad(loss)(state), opt_state)
    return optax.apply_updates(state, updates), opt_state

  before = float(jnp.max(jnp.abs(solve(student_def, student_state) - target)))
  for _ in range(300):
    student_state, opt_state = step(student_state, opt_state)
  after = float(jnp.max(jnp.abs(solve(student_def, student_state) - target)))
  assert after < 0.05 * before, (before, after)


def _stage_block(stage_fraction: float, max_steps: int, seed: int) -> IMBlock:
  """A 3-feature block solving its stage at ``stage_fraction`` by Picard to rtol 1e-7."""
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(max_steps,),
                              dilations=(1,), stage_fraction=stage_fraction, solver="picard",
                              rtol=1e-7)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(seed))
  block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
  return block


def test_fixed_point_mismatch_reads_a_stage_blocks_answer_through_its_stage():
  # A block with stage_fraction s answers y = g0 + eta f(k), k its stage: the mismatch of
  # its own answer is zero, and equals the implicit Euler mismatch of the stage k.
  block = _stage_block(0.4, max_steps=300, seed=0)
  g0 = jax.random.normal(jax.random.key(17), (2, 5, 5, 3))
  k = block.solve(g0).value
  answer = block(g0)
  assert float(jnp.max(contractive.fixed_point_mismatch(block, g0, answer))) < 1e-9
  assert float(jnp.max(jnp.abs(answer - k))) > 0.1  # the answer is not the stage
  other = answer * 1.01
  t_map, f_state = block.map_fn()
  stage = g0 + 0.4 * (other - g0)
  expected = (np.sum(np.square(np.asarray(t_map(stage, (g0, f_state)) - stage)), (1, 2, 3))
              / np.sum(np.square(np.asarray(stage - g0)), (1, 2, 3)))
  np.testing.assert_allclose(contractive.fixed_point_mismatch(block, g0, other), expected,
                             rtol=1e-4)


def test_fixed_point_mismatch_of_a_two_stage_block_is_its_second_stages_residual():
  # A two-stage block (SDIRK, fraction G) answers y from k1 = g0 + G eta f(k1) and
  # y = c + G eta f(y), c = g0 + (1 - G) eta f(k1): the mismatch of an answer y_t is
  # ||c + G eta f(y_t) - y_t||^2 / ||y_t - g0||^2 with k1 solved from g0 (here by a
  # plain 400-step Picard loop), zero for the block's own answer; its gradient takes f's
  # parameters through f(y_t) and through c's f(k1), k1 a constant.
  gamma = 0.5
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(300,), dilations=(1,),
                              stage_fraction=gamma, stages=2, solver="picard", rtol=1e-7)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(4))
  block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)
  g0 = jax.random.normal(jax.random.key(23), (2, 5, 5, 3))
  answer = block(g0)
  assert float(jnp.max(contractive.fixed_point_mismatch(block, g0, answer))) < 1e-9
  target = answer * 1.03 + 0.01
  graphdef, state = nnx.split(block)
  k1 = np.asarray(nnx.jit(lambda b: jax.lax.fori_loop(
      0, 400, lambda _, k: g0 + gamma * b.f(k), g0))(block))

  def by_hand(state):
    f = nnx.merge(graphdef, state).f
    c = g0 + (1 - gamma) * f(jnp.asarray(k1))
    residual = c + gamma * f(target) - target
    return (jnp.sum(jnp.square(residual), (1, 2, 3))
            / jnp.sum(jnp.square(target - g0), (1, 2, 3)))

  mismatch = lambda st: contractive.fixed_point_mismatch(  # noqa: E731
      nnx.merge(graphdef, st), g0, target)
  np.testing.assert_allclose(mismatch(state), by_hand(state), rtol=1e-4)
  grads = jax.grad(lambda st: jnp.mean(mismatch(st)))(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               grads, jax.grad(lambda st: jnp.mean(by_hand(st)))(state))
  # Given stage points are used as they are (the training step solves stage 1 once).
  points = block.stage_points(g0, target)
  # Stopped short of its solution (4 steps), stage 1 gives the forward pass's base
  # c = g0 + (1 - G) (k1 - g0) / G, not one through f(k1): matching trains the block
  # that runs.
  short = IMBlock(dataclasses.replace(cfg, iterations=(4,), rtol=0.0), 0, rngs=nnx.Rngs(4))
  nnx.update(short, nnx.state(block))
  (_, first), (forward_base, _) = short.solve_stages(g0)
  short_points = short.stage_points(g0, target)
  np.testing.assert_array_equal(short_points[0][1], first.value)
  np.testing.assert_allclose(short_points[1][0], forward_base, rtol=1e-6, atol=1e-6)
  through_f = g0 + (1 - gamma) * short.f(first.value)
  assert float(jnp.max(jnp.abs(through_f - forward_base))) > 1e-3
  # ... whose derivative is still that of (1 - G) f(k1), as at a solved stage.
  short_graph, short_state = nnx.split(short)

  def short_by_hand(state):
    f = nnx.merge(short_graph, state).f
    fk1 = f(first.value)
    c = forward_base + (1 - gamma) * (fk1 - jax.lax.stop_gradient(fk1))
    residual = c + gamma * f(target) - target
    return jnp.mean(jnp.sum(jnp.square(residual), (1, 2, 3))
                    / jnp.sum(jnp.square(target - g0), (1, 2, 3)))
  short_grads = jax.grad(lambda st: jnp.mean(contractive.fixed_point_mismatch(
      nnx.merge(short_graph, st), g0, target)))(short_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               short_grads, jax.grad(short_by_hand)(short_state))
  np.testing.assert_allclose(points[0][1], k1, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      contractive.fixed_point_mismatch(block, g0, target, stage_points=points),
      contractive.fixed_point_mismatch(block, g0, target))
  # The penalty at a block's stage points sums their hinges and reports the larger figure.
  model = minet_jax.MINet(dataclasses.replace(cfg, contractive_target=0.0,
                                              contractive_kind="radius"), rngs=nnx.Rngs(4))
  nnx.update(model.im_blocks[0], nnx.state(block))
  key = jax.random.key(24)
  total, sigma = contractive.penalty_at_points(model, [points], key=key, per_block=True)
  block_key = jax.random.split(key, 1)[0]  # the one block's key
  stage_keys = [block_key, jax.random.split(jax.random.fold_in(block_key, 1), 1)[0]]
  assert [jax.random.key_data(k).tolist() for k in spectral.stage_keys(block_key, 2)] == [
      jax.random.key_data(k).tolist() for k in stage_keys]
  terms = [contractive.block_term(block, b, g, k, kind="radius", num_iters=cfg.contractive_iters,
                                  target=0.0) for (b, g), k in zip(points, stage_keys)]
  np.testing.assert_allclose(total, terms[0][0] + terms[1][0], rtol=1e-5)
  np.testing.assert_allclose(sigma[0], max(terms[0][1], terms[1][1]), rtol=1e-5)
  with pytest.raises(ValueError, match="operating points must be one"):
    contractive.penalty_at_points(model, [[points[0], (g0,)]], key=key)
  # operating_points gives a two-stage block's every stage (base, solution).
  images = jax.random.uniform(jax.random.key(25), (1, 8, 6, 3))
  (block_points,) = contractive.operating_points(model, images)
  (run,) = model.solve_blocks(model.model_input(images))
  assert len(block_points) == 2
  for (base, g), (run_base, run_g) in zip(block_points, run.points):
    np.testing.assert_array_equal(base, run_base)
    np.testing.assert_array_equal(g, run_g)


def test_fixed_point_mismatch_after_warm_started_steps_measures_the_answers_error():
  # m Picard steps from the teacher's stage k: the distance of T(k_{m-1}) from k, with
  # only the last step differentiated; for a contraction it tends to the distance of the
  # block's own solution k* from k.
  block = _stage_block(0.5, max_steps=400, seed=3)
  g0 = jax.random.normal(jax.random.key(21), (2, 5, 5, 3))
  target = block(g0) * 1.05 + 0.02  # a teacher's answer that is not this block's
  t_map, f_state = block.map_fn()
  k = np.asarray(g0 + 0.5 * (target - g0))
  scale = np.sum(np.square(k - np.asarray(g0)), (1, 2, 3))

  def by_hand(steps):
    g = k
    for _ in range(steps):
      g = np.asarray(t_map(jnp.asarray(g), (g0, f_state)))
    return np.sum(np.square(g - k), (1, 2, 3)) / scale

  for steps in (1, 3):
    np.testing.assert_allclose(contractive.fixed_point_mismatch(block, g0, target, steps),
                               by_hand(steps), rtol=1e-5)
  solution = np.asarray(block.solve(g0).value)  # k*, Picard to rtol 1e-7
  answer_error = np.sum(np.square(solution - k), (1, 2, 3)) / scale
  np.testing.assert_allclose(contractive.fixed_point_mismatch(block, g0, target, 200),
                             answer_error, rtol=1e-4)

  # The gradient is that of the last step from the (constant) iterate k_2.
  graphdef, state = nnx.split(block)
  start = jnp.asarray(k)
  for _ in range(2):
    start = t_map(start, (g0, f_state))
  start = np.asarray(start)

  def last_step(state):
    t, f = nnx.merge(graphdef, state).map_fn()
    return jnp.mean(jnp.sum(jnp.square(t(jnp.asarray(start), (g0, f)) - k), (1, 2, 3)) / scale)

  grads = jax.grad(lambda st: jnp.mean(contractive.fixed_point_mismatch(
      nnx.merge(graphdef, st), g0, target, 3)))(state)
  expected = jax.grad(last_step)(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, expected)
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    contractive.fixed_point_mismatch(block, g0, target, 0)


def test_radius_and_norm_estimates_run_on_bfloat16_features():
  # A model computing in bfloat16 hands the penalty bfloat16 points; the power
  # iteration's unit vectors come back in float32 and must not reach the bfloat16
  # linearisation as they are (jax refuses tangents of another dtype).
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(4,), dilations=(1,),
                              dtype="bfloat16")
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  g0 = jax.random.normal(jax.random.key(14), (2, 4, 4, 3)).astype(jnp.bfloat16)
  g = block(g0)
  reference_block = IMBlock(dataclasses.replace(cfg, dtype="float32"), 0, rngs=nnx.Rngs(0))
  for estimator in (contractive.block_radius, contractive.block_spectral_norm,
                    contractive.block_radius_exact):
    estimate = estimator(block, g0, g, jax.random.key(15), 8)
    reference = estimator(reference_block, g0.astype(jnp.float32), g.astype(jnp.float32),
                          jax.random.key(15), 8)
    assert estimate.shape == (2,) and np.all(np.isfinite(estimate))
    np.testing.assert_allclose(estimate, reference, rtol=0.1)
  # With enough steps the exact estimate's projection is used in bfloat16 too, where it
  # is in float32 (sample 0; sample 1's dominant eigenvalues crowd, and 200 float32
  # steps do not settle it), to the same radius, with a finite gradient.
  graphdef, state = nnx.split(block)

  def exact(s):
    value, found = contractive.block_radius_exact(nnx.merge(graphdef, s), g0, g,
                                                  jax.random.key(15), 60, with_found=True)
    return value[0], (value[0], found[0])

  grad, (value, found) = jax.grad(exact, has_aux=True)(state)
  reference, reference_found = contractive.block_radius_exact(
      reference_block, g0.astype(jnp.float32), g.astype(jnp.float32), jax.random.key(15), 60,
      with_found=True)
  assert bool(found) and bool(reference_found[0])
  assert float(value) == pytest.approx(float(reference[0]), rel=0.01)
  assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(grad))
