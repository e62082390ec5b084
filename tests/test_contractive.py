"""The contractivity penalty against dense Jacobians, and that it does its job."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import minet_jax
from minet_jax import contractive
from minet_jax import fixed_point as fp
from minet_jax.model import IMBlock


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
  direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(4), x.shape), state)
  eps = 1e-3
  plus = jax.tree.map(lambda x, d: x + eps * d, state, direction)
  minus = jax.tree.map(lambda x, d: x - eps * d, state, direction)
  fd = (_dense_norms(graphdef, plus, g0, g)[0] ** 2
        - _dense_norms(graphdef, minus, g0, g)[0] ** 2) / (2 * eps)
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
