"""The fixed-point engine against closed forms, finite differences and long solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax.core import fixed_point as fp
from minet_jax.core.model import IMBlock

ITERATIVE = ("picard", "anderson")


SOLVER_CLASSES = {"unrolled": fp.Unrolled, "picard": fp.Picard, "anderson": fp.Anderson}
# The adjoints that give the exact gradient of the fixed point.
ADJOINT_CLASSES = {"backprop": fp.Backprop, "implicit": fp.Implicit}


def _linear_problem(n=6, radius=0.8, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, n))
  a *= radius / np.linalg.norm(a, 2)
  return a.astype(np.float32), rng.normal(size=n).astype(np.float32)


def _linear_map(z, args):
  a, b = args
  return a @ z + b


@pytest.mark.parametrize("solver", ITERATIVE + ("unrolled",))
@pytest.mark.parametrize("backward", tuple(ADJOINT_CLASSES))
def test_linear_fixed_point_and_gradient_match_closed_form(solver, backward):
  a, b = _linear_problem()
  c = np.random.default_rng(1).normal(size=a.shape[0]).astype(np.float32)
  method = SOLVER_CLASSES[solver](rtol=1e-7, unroll=1)
  kw = dict(max_steps=120, adjoint=ADJOINT_CLASSES[backward]())

  def loss(a, b):
    return jnp.dot(c, fp.fixed_point(_linear_map, method, jnp.zeros_like(b), (a, b), **kw).value)

  result = jax.jit(
      lambda a, b: fp.fixed_point(_linear_map, method, jnp.zeros_like(b), (a, b), **kw))(a, b)
  ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  i_minus_a = np.eye(len(b)) - a.astype(np.float64)
  z_star = np.linalg.solve(i_minus_a, b)
  u = np.linalg.solve(i_minus_a.T, c)  # dL/db = (I - A)^-T c, dL/dA = u z*^T.
  np.testing.assert_allclose(result.value, z_star, atol=2e-5)
  np.testing.assert_allclose(gb, u, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ga, np.outer(u, z_star), rtol=1e-4, atol=1e-4)
  assert result.residual_history.shape == (120,)
  if solver != "unrolled":
    steps = int(result.num_steps)
    assert 1 < steps < 120 and float(result.residual) <= 1e-7 + 1e-12
    assert np.all(np.isfinite(result.residual_history[:steps]))
    assert np.all(np.isnan(result.residual_history[steps:]))


def test_backprop_mode_evaluates_with_an_early_exit_loop():
  a, b = _linear_problem()
  method = fp.Anderson(rtol=1e-6, unroll=1)
  kw = dict(max_steps=50, adjoint=fp.Backprop())
  forward = str(jax.make_jaxpr(
      lambda b: fp.fixed_point(_linear_map, method, b, (a, b), **kw).value)(b))
  assert "while" in forward and "scan" not in forward
  gradient = str(jax.make_jaxpr(jax.grad(
      lambda b: fp.fixed_point(_linear_map, method, b, (a, b), **kw).value.sum()))(b))
  assert "scan" in gradient


def _tiny_block(eta=1.0, gain=0.3, seed=0):
  """An IM-block of a 4-feature model, made contractive by a small last IN scale."""
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(1,), dilations=(1,), eta=eta)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(seed))
  block.f.norm2.scale[...] = jnp.full((4,), gain, jnp.float32)
  block.f.norm2.bias[...] = jnp.linspace(-0.2, 0.3, 4)
  graphdef, state = nnx.split(block)
  return graphdef, state


def _block_solve(graphdef, state, g0, solver, **kw):
  block = nnx.merge(graphdef, state)
  t_map, f_state = block.map_fn()
  return fp.fixed_point(t_map, solver, g0, (g0, f_state), per_sample=True, **kw)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def test_implicit_gradient_matches_finite_differences_and_long_unrolled_solve():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  weights = jax.random.normal(jax.random.key(1), g0.shape)

  def loss(state, g0, **kw):
    z = _block_solve(graphdef, state, g0, **kw).value
    return jnp.sum(jnp.sin(z) * weights)

  implicit = dict(solver=fp.Picard(rtol=1e-6, unroll=1), max_steps=80,
                  adjoint=fp.Implicit(rtol=1e-7))
  unrolled = dict(solver=fp.Unrolled(unroll=1), max_steps=80, adjoint=fp.Backprop())
  assert float(jnp.max(_block_solve(graphdef, state, g0, **implicit).residual)) <= 1e-6
  g_imp = jax.jit(jax.grad(lambda s, g: loss(s, g, **implicit), argnums=(0, 1)))(state, g0)
  g_unr = jax.jit(jax.grad(lambda s, g: loss(s, g, **unrolled), argnums=(0, 1)))(state, g0)
  np.testing.assert_allclose(_flat(g_imp), _flat(g_unr), rtol=2e-4, atol=2e-5)

  # Central differences along one random direction in (parameters, g0), on the long
  # fixed-length solve: a solve to tolerance would add its stopping noise to the quotient.
  keys = jax.random.split(jax.random.key(2), len(jax.tree.leaves((state, g0))))
  leaves, treedef = jax.tree.flatten((state, g0))
  direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape)
                                           for k, x in zip(keys, leaves)])
  # The block's relus put kinks in the loss: the step must be small enough not to cross one.
  eps = 1e-4
  f = jax.jit(lambda s, g: loss(s, g, **unrolled))
  plus = jax.tree.map(lambda x, d: x + eps * d, (state, g0), direction)
  minus = jax.tree.map(lambda x, d: x - eps * d, (state, g0), direction)
  fd = (float(f(*plus)) - float(f(*minus))) / (2 * eps)
  analytic = float(jnp.dot(_flat(g_imp), _flat(direction)))
  assert abs(fd - analytic) <= 1e-2 * abs(analytic), (fd, analytic)


def test_anderson_reaches_picard_solution_in_fewer_evaluations():
  # eta = 2.8 pushes the contraction factor of the tiny block close to 1: Picard is slow.
  graphdef, state = _tiny_block(eta=2.8, gain=0.3)
  g0 = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
  solve = jax.jit(lambda s, g, solver: _block_solve(graphdef, s, g, solver, max_steps=300),
                  static_argnums=2)
  picard = solve(state, g0, fp.Picard(rtol=1e-6, unroll=1))
  anderson = solve(state, g0, fp.Anderson(rtol=1e-6, unroll=1))
  assert float(picard.residual[0]) <= 1e-6 and float(anderson.residual[0]) <= 1e-6
  assert int(picard.num_steps[0]) >= 60, "the problem should be slow for Picard"
  assert int(anderson.num_steps[0]) <= 0.5 * int(picard.num_steps[0])
  scale = float(jnp.max(jnp.abs(picard.value)))
  np.testing.assert_allclose(anderson.value, picard.value, atol=1e-4 * scale)


def _train_step_temp_bytes(solver, adjoint, steps):
  graphdef, state = _tiny_block()
  g0 = jnp.ones((1, 16, 16, 4))

  def loss(state):
    z = _block_solve(graphdef, state, g0, solver(rtol=0.0, unroll=1), max_steps=steps,
                     adjoint=adjoint).value
    return jnp.sum(z * z)

  compiled = jax.jit(jax.grad(loss)).lower(state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_implicit_backward_memory_is_flat_in_iterations():
  backprop = [_train_step_temp_bytes(fp.Unrolled, fp.Backprop(), t) for t in (4, 16)]
  implicit = [_train_step_temp_bytes(fp.Picard, fp.Implicit(), t) for t in (4, 16)]
  unrolled_implicit = [_train_step_temp_bytes(fp.Unrolled, fp.Implicit(), t) for t in (4, 16)]
  # One 16x16x4 float32 map is 4 KiB; backprop keeps at least one per step.
  assert backprop[1] - backprop[0] > 12 * 4096, backprop
  assert abs(implicit[1] - implicit[0]) <= 4096, implicit
  assert abs(unrolled_implicit[1] - unrolled_implicit[0]) <= 4096, unrolled_implicit
  assert implicit[-1] < backprop[-1]


def test_per_sample_stopping_freezes_converged_samples():
  graphdef, state = _tiny_block()
  easy = jnp.zeros((1, 8, 8, 4))
  hard = 30.0 * jax.random.normal(jax.random.key(4), (1, 8, 8, 4))
  solve = jax.jit(lambda g: _block_solve(graphdef, state, g, fp.Anderson(rtol=1e-5, unroll=1),
                                         max_steps=60))
  both = solve(jnp.concatenate([easy, hard]))
  alone = [solve(easy), solve(hard)]
  for i in range(2):
    assert int(both.num_steps[i]) == int(alone[i].num_steps[0])
    scale = float(jnp.max(jnp.abs(alone[i].value)))
    np.testing.assert_allclose(both.value[i], alone[i].value[0], atol=1e-4 * scale)
  assert both.residual_history.shape == (2, 60)
  assert solve._cache_size() == 2  # batch of 2 and batch of 1; no recompiles per input.


def test_unrolled_is_a_plain_loop_bit_for_bit():
  graphdef, state = _tiny_block()
  g0 = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
  got = jax.jit(lambda g: _block_solve(graphdef, state, g, fp.Unrolled(unroll=1),
                                       max_steps=8).value)(g0)

  def loop(g0):
    block = nnx.merge(graphdef, state)
    g = g0
    for _ in range(8):
      g = g0 + block.eta * block.f(g)
    return g
  np.testing.assert_array_equal(got, jax.jit(loop)(g0))


def test_model_diagnostics_come_from_one_compilation(random_params):
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(5, 7), dilations=(1, 2),
                              solver="picard", rtol=1e-4, unroll=1)
  model = minet_jax.model_from_params(random_params(cfg))
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward_rgb_with_diagnostics(x))
  for seed in range(2):
    x = jax.random.uniform(jax.random.key(seed), (1, 12, 10, 3))
    y, results = run(state, x)
    assert y.shape == x.shape and len(results) == 2
    assert [r.residual_history.shape for r in results] == [(1, 5), (1, 7)]
    for r in results:
      steps = int(r.num_steps[0])
      assert 1 <= steps <= r.residual_history.shape[1]
      np.testing.assert_array_equal(r.residual, r.residual_history[:, steps - 1])
      # atol = 0: the test is residual <= rtol.
      np.testing.assert_array_equal(r.status == fp.RESULTS.successful, r.residual <= 1e-4)
  assert run._cache_size() == 1


def test_bad_settings_name_the_problem():
  a, b = _linear_problem()
  with pytest.raises(ValueError, match="unknown solver"):
    fp.fixed_point(_linear_map, "newton", b, (a, b), max_steps=3)
  with pytest.raises(ValueError, match="unknown adjoint"):
    fp.fixed_point(_linear_map, fp.Picard(), b, (a, b), max_steps=3, adjoint="adjoint")
  with pytest.raises(ValueError, match="Anderson.beta"):
    fp.Anderson(beta=0.0)
  with pytest.raises(ValueError, match="solver must be one of"):
    minet_jax.ModelConfig(solver="broyden")
  with pytest.raises(ValueError, match="Anderson.m"):
    fp.Anderson(m=0)
  with pytest.raises(ValueError, match="Picard.rtol"):
    fp.Picard(rtol=-1.0)
  with pytest.raises(ValueError, match="Anderson.atol must be finite and >= 0, got None"):
    fp.Anderson(atol=None)  # None is the adjoint's "the forward solver's", not a tolerance.
  with pytest.raises(ValueError, match="Unrolled.unroll"):
    fp.Unrolled(unroll=0)
  with pytest.raises(ValueError, match="Implicit.max_steps"):
    fp.Implicit(max_steps=-1)
  with pytest.raises(ValueError, match="max_steps"):
    fp.fixed_point(_linear_map, fp.Picard(), b, (a, b), max_steps=2.5)
  # Each refused where it is given, not as a TypeError deep inside the solve.
  with pytest.raises(ValueError, match="Anderson.m must be an integer >= 1, got 2.0"):
    fp.Anderson(m=2.0)
  assert fp.Anderson(m=jnp.int32(3)) == fp.Anderson(m=3)  # numpy and JAX integers are ints
  assert hash(fp.Implicit(max_steps=np.array(3))) == hash(fp.Implicit(max_steps=3))
  assert fp.fixed_point(_linear_map, fp.Picard(), b, (a, b), max_steps=np.int64(2)).num_steps == 2
  with pytest.raises(ValueError, match="max_steps must be an integer >= 0, got None"):
    fp.fixed_point(_linear_map, fp.Picard(), b, (a, b), max_steps=None)
  with pytest.raises(ValueError, match="Unrolled.rtol must be finite and >= 0, got inf"):
    fp.Unrolled(rtol=float("inf"))
  with pytest.raises(ValueError, match="per_sample=True needs every leaf"):
    fp.fixed_point(_linear_map, fp.Picard(), 1.0, (a, b), max_steps=3, per_sample=True)
  with pytest.raises(ValueError, match="anderson_m must be an integer, got 2.0"):
    minet_jax.ModelConfig(anderson_m=2.0)


# ------------------------------------------------------------------ status

SOLVERS_TO_TOLERANCE = [fp.Unrolled(rtol=1e-6, unroll=1), fp.Picard(rtol=1e-6, unroll=1),
                        fp.Anderson(rtol=1e-6, unroll=1)]
_IDS = ["unrolled", "picard", "anderson"]


def _per_sample_scaling(z, args):
  """z -> a z + b with one (a, b) per sample: fixed point b / (1 - a) where a != 1."""
  a, b = args
  return a[:, None] * z + b[:, None]


def _doubling(z, _):
  """z -> 2 z + 1: its fixed point -1 repels, so Picard runs off to infinity."""
  return 2.0 * z + 1.0


@pytest.mark.parametrize("solver", SOLVERS_TO_TOLERANCE, ids=_IDS)
def test_solved_linear_contraction_is_successful(solver):
  a, b = _linear_problem()
  result = jax.jit(lambda a, b: fp.fixed_point(_linear_map, solver, jnp.zeros_like(b), (a, b),
                                               max_steps=200))(a, b)
  z_star = np.linalg.solve(np.eye(len(b)) - a.astype(np.float64), b)
  assert result.status.dtype == jnp.int32
  assert int(result.status) == fp.RESULTS.successful
  np.testing.assert_allclose(result.value, z_star, atol=2e-5)


@pytest.mark.parametrize("solver", SOLVERS_TO_TOLERANCE, ids=_IDS)
def test_too_few_steps_reach_max_steps(solver):
  a, b = _linear_problem()
  result = fp.fixed_point(_linear_map, solver, jnp.zeros_like(b), (a, b), max_steps=3)
  assert int(result.status) == fp.RESULTS.max_steps_reached
  assert int(result.num_steps) == 3 and float(result.residual) > 1e-6
  none = fp.fixed_point(_linear_map, solver, b, (a, b), max_steps=0)
  assert int(none.status) == fp.RESULTS.max_steps_reached and int(none.num_steps) == 0


@pytest.mark.parametrize("adjoint", [fp.Backprop(), fp.Implicit(), fp.Phantom()],
                         ids=["backprop", "implicit", "phantom"])
@pytest.mark.parametrize("solver", [fp.Unrolled(), fp.Picard(), fp.Anderson()],
                         ids=["unrolled", "picard", "anderson"])
def test_no_step_passes_its_input_through_in_value_and_gradient(solver, adjoint):
  """With max_steps 0 (a block of ``iterations`` 0) the answer is z0: d/dz0 = 1 and the
  map's inputs get no gradient. The implicit and phantom rules took z0 for the fixed
  point and gave the map's inputs a gradient of d z*/d a."""
  def answer(z0, a):
    return jnp.sum(fp.fixed_point(lambda z, a: 0.5 * z + a, solver, z0, a, max_steps=0,
                                  adjoint=adjoint).value)

  z0, a = jnp.asarray([1.0, -2.0]), jnp.asarray([3.0, 0.5])
  np.testing.assert_array_equal(answer(z0, a), jnp.sum(z0))
  dz0, da = jax.grad(answer, argnums=(0, 1))(z0, a)
  np.testing.assert_array_equal(dz0, [1.0, 1.0])
  np.testing.assert_array_equal(da, [0.0, 0.0])


@pytest.mark.parametrize("solver", [fp.Unrolled(unroll=1), fp.Picard(rtol=1e-6),
                                    fp.Anderson(m=1, rtol=1e-6)],
                         ids=["unrolled", "picard", "anderson-m1"])
def test_diverging_map_is_nonfinite(solver):
  result = jax.jit(lambda z: fp.fixed_point(_doubling, solver, z, max_steps=300))(jnp.zeros(3))
  assert int(result.status) == fp.RESULTS.nonfinite
  assert np.isnan(float(result.residual))
  if not isinstance(solver, fp.Unrolled):
    # Stopped where the float32 norms overflowed (|z| ~ 2^64), long before the cap.
    assert int(result.num_steps) < 100
    assert np.all(np.isnan(result.residual_history[int(result.num_steps):]))


@pytest.mark.parametrize("solver", [fp.Unrolled(rtol=1e-3), fp.Picard(rtol=1e-3)],
                         ids=["unrolled", "picard"])
def test_a_map_value_of_zero_is_a_finite_point(solver):
  # T(x) = 0 with x != 0 used to read as an overflow (nonfinite): relative to 0 the
  # residual is as large as float32 holds, and 0 at the fixed point.
  relu = fp.fixed_point(lambda z, _: jax.nn.relu(z - 10.0), solver, jnp.full((2, 4), 5.0),
                        max_steps=3, per_sample=True)
  np.testing.assert_array_equal(relu.status, fp.RESULTS.successful)
  assert np.all(relu.residual_history[:, 0] > 1e30) and np.all(relu.residual == 0)
  # Each sample's test is its own: one that overflows beside one that converges.
  mixed = fp.fixed_point(lambda z, b: 0.5 * z + b, solver, jnp.zeros((2, 4)),
                         jnp.array([[3e19] * 4, [1.0] * 4]), max_steps=12, per_sample=True)
  assert list(mixed.status) == [fp.RESULTS.nonfinite, fp.RESULTS.successful]


def test_anderson_breakdown_falls_back_to_the_newest_pair_after_the_history_wraps():
  # Residuals that are all zero make the unregularised least squares singular: the step
  # is then plain Picard, x <- the newest map value, which at k = 4 with m = 3 sits in
  # ring slot 1, not in the last slot (2).
  solver = fp.Anderson(m=3, reg=0.0)
  accel = solver._init(jnp.zeros((1, 2)), 1)
  for k, value in enumerate((10.0, 20.0, 30.0, 40.0, 50.0)):
    x = jnp.full((1, 2), value)
    nxt, accel = solver._next(k, x, x, accel)
    assert np.all(np.isfinite(nxt))
    np.testing.assert_array_equal(nxt, x)




def test_unrolled_implicit_sums_max_steps_plus_one_neumann_terms():
  # z = j z + a: the adjoint of `Unrolled` with N steps from u = z_bar is
  # z_bar (1 + j + ... + j^N); backprop through the N forward steps from 0 has N terms.
  j, n = 0.5, 3

  def grad(adjoint):
    return float(jax.grad(lambda a: fp.fixed_point(lambda z, a: j * z + a, fp.Unrolled(),
                                                   jnp.zeros(()), a, max_steps=n,
                                                   adjoint=adjoint).value)(1.0))
  assert grad(fp.Implicit()) == pytest.approx(sum(j**k for k in range(n + 1)))
  assert grad(fp.Backprop()) == pytest.approx(sum(j**k for k in range(n)))


def test_anderson_without_reg_differentiates_through_a_breakdown():
  # Sample 0 converges early and stays frozen while sample 1 runs on: its stored residuals
  # coincide, the unregularised small solve is singular and its steps fall back to Picard.
  # Backprop through those steps must stay finite and match the analytic derivative of the
  # fixed point z = a z + b: dz/db = 1 / (1 - a).
  a = jnp.array([0.1, 0.9])

  def solve(b):
    return fp.fixed_point(lambda z, b: a * z + b, fp.Anderson(m=3, rtol=1e-4, reg=0.0),
                          jnp.zeros(2), b, max_steps=12, per_sample=True)

  b = jnp.ones(2)
  result = solve(b)
  np.testing.assert_allclose(result.value, b / (1 - a), rtol=1e-4)
  grad = jax.grad(lambda b: jnp.sum(solve(b).value))(b)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, 1 / (1 - a), rtol=1e-3)


def test_anderson_finds_a_repelling_fixed_point_and_misses_a_missing_one():
  # Anderson solves linear maps in a few steps whether or not the fixed point attracts.
  z0 = jnp.zeros(3)
  doubling = fp.fixed_point(_doubling, fp.Anderson(rtol=1e-6), z0, max_steps=50)
  assert int(doubling.status) == fp.RESULTS.successful
  np.testing.assert_allclose(doubling.value, -np.ones(3), atol=1e-5)
  # exp(z) = z has no real solution: whatever happens, it is not a success.
  missing = fp.fixed_point(lambda z, _: jnp.exp(z), fp.Anderson(rtol=1e-6), z0, max_steps=50)
  assert int(missing.status) != fp.RESULTS.successful


@pytest.mark.parametrize("solver", [fp.Unrolled(rtol=1e-6, unroll=1),
                                    fp.Picard(rtol=1e-6, unroll=1)], ids=["unrolled", "picard"])
def test_status_is_per_sample(solver):
  # Sample 0 contracts fast, sample 1 too slowly for 300 steps, sample 2 diverges.
  a, b = jnp.array([0.5, 0.999, 2.0]), jnp.ones(3)
  z0 = jnp.zeros((3, 4))
  solve = jax.jit(lambda a, b: fp.fixed_point(_per_sample_scaling, solver, z0, (a, b),
                                              max_steps=300, per_sample=True))
  result = solve(a, b)
  np.testing.assert_array_equal(result.status, [fp.RESULTS.successful,
                                                fp.RESULTS.max_steps_reached,
                                                fp.RESULTS.nonfinite])
  np.testing.assert_allclose(result.value[0], 2.0, rtol=1e-5)
  assert int(result.num_steps[1]) == 300
  if isinstance(solver, fp.Picard):
    assert int(result.num_steps[0]) < 40 and int(result.num_steps[2]) < 100
  # The same statuses come out of the differentiable (masked scan) path.
  primal = jax.jvp(lambda b: fp.fixed_point(_per_sample_scaling, solver, z0, (a, b),
                                            max_steps=300, per_sample=True),
                   (b,), (jnp.ones(3),))[0]
  np.testing.assert_array_equal(primal.status, result.status)
  np.testing.assert_array_equal(primal.num_steps, result.num_steps)


def test_from_config_builds_the_named_objects():
  cfg = minet_jax.ModelConfig(solver="anderson", anderson_m=3, anderson_beta=0.5,
                              anderson_reg=1e-4, rtol=1e-4, atol=1e-6, unroll=2,
                              backward="implicit", adjoint_rtol=1e-5)
  solver, adjoint = fp.from_config(cfg)
  assert solver == fp.Anderson(m=3, beta=0.5, reg=1e-4, rtol=1e-4, atol=1e-6, unroll=2)
  # adjoint_max_steps = 0 means the block's own step cap.
  assert adjoint == fp.Implicit(max_steps=None, rtol=1e-5, atol=0.0)
  assert fp.from_config(minet_jax.ModelConfig()) == (fp.Unrolled(rtol=1e-3), fp.Backprop())
  picard = minet_jax.ModelConfig(solver="picard", backward="implicit", adjoint_max_steps=7)
  assert fp.from_config(picard) == (fp.Picard(rtol=1e-3), fp.Implicit(7, 1e-3, 0.0))
  hash((solver, adjoint))  # static under jit
  assert fp.Implicit(rtol=1e-7).adjoint_solver(solver) == fp.Anderson(
      m=3, beta=0.5, reg=1e-4, rtol=1e-7, atol=1e-6, unroll=2)


def test_registries_name_every_class_once():
  assert fp.SOLVERS == ("unrolled", "picard", "anderson")
  assert [fp.stops_at_tolerance(name) for name in fp.SOLVERS] == [False, True, True]
  assert fp.BACKWARDS == ("backprop", "implicit", "phantom")
  assert minet_jax.core.config.SOLVERS is fp.SOLVERS and minet_jax.core.config.BACKWARDS is fp.BACKWARDS
  cfg = minet_jax.ModelConfig(solver="picard", backward="phantom", phantom_steps=3,
                              phantom_damping=0.5, best_so_far=True)
  assert fp.from_config(cfg) == (fp.Picard(rtol=1e-3, best_so_far=True),
                                 fp.Phantom(steps=3, damping=0.5))
  with pytest.raises(ValueError, match="backward must be one of"):
    minet_jax.ModelConfig(backward="jfb")


def test_damped_phantom_gradients_are_refused_for_stage_blocks():
  # A stage block answers g0 + (k - g0) / s. One damped step from the (constant) stage
  # solution gives k the tangent tau * dT/dg0 = tau, so d answer / d g0 = 1 - (1 - tau) / s
  # = -0.667 at s = 0.3, tau = 0.5, where finite differences give 1.46.
  s, tau = 0.3, 0.5

  def answer(g0, adjoint):
    t_map = lambda k, g0: g0 + s * 0.5 * jnp.tanh(k)  # noqa: E731
    k = fp.fixed_point(t_map, fp.Picard(rtol=1e-7), g0, g0, max_steps=100,
                       adjoint=adjoint).value
    return g0 + (k - g0) / s

  g0 = jnp.float32(0.4)
  truth = (answer(g0 + 1e-3, fp.Backprop()) - answer(g0 - 1e-3, fp.Backprop())) / 2e-3
  assert float(jax.grad(answer)(g0, fp.Implicit())) == pytest.approx(float(truth), rel=1e-2)
  assert float(jax.grad(answer)(g0, fp.Phantom())) > 0  # undamped: the right sign
  assert float(jax.grad(answer)(g0, fp.Phantom(damping=tau))) < 0 < float(truth)
  with pytest.raises(ValueError, match="phantom_damping below 1 is defined for implicit "
                                       r"Euler blocks \(stage_fraction 1\) only"):
    minet_jax.ModelConfig(backward="phantom", phantom_damping=tau, stage_fraction=(1.0, s, 1.0))
  # Undamped steps, or damped ones on implicit Euler blocks, are what the method is.
  minet_jax.ModelConfig(backward="phantom", phantom_damping=1.0, stage_fraction=s)
  minet_jax.ModelConfig(backward="phantom", phantom_damping=tau, phantom_steps=3)
  minet_jax.ModelConfig(backward="implicit", phantom_damping=tau, stage_fraction=s)


@pytest.mark.parametrize("steps,damping", [(1, 1.0), (3, 0.5)])
def test_phantom_gradient_is_that_of_k_damped_steps_at_the_solution(steps, damping):
  """Dense reference: z* from a long float64 solve, then the k steps differentiated."""
  a, b = _linear_problem(radius=0.7)
  c = np.random.default_rng(2).normal(size=a.shape[0]).astype(np.float32)

  def tanh_map(z, args):
    a, b = args
    return jnp.tanh(a @ z + b)

  solve = dict(max_steps=200, adjoint=fp.Phantom(steps=steps, damping=damping))

  def loss(a, b):
    result = fp.fixed_point(tanh_map, fp.Picard(rtol=1e-7, unroll=1), jnp.zeros_like(b), (a, b),
                            **solve)
    return jnp.dot(c, result.value), result.value

  (value, z), (ga, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(a, b)
  z_star = np.zeros(len(b))
  for _ in range(500):
    z_star = np.tanh(a.astype(np.float64) @ z_star + b)
  np.testing.assert_allclose(z, z_star, atol=1e-5)  # the value is the solver's answer

  def reference(a, b):  # k damped steps from the (constant) solution
    zk = jnp.asarray(z_star, jnp.float32)
    for _ in range(steps):
      zk = (1 - damping) * zk + damping * tanh_map(zk, (a, b))
    return jnp.dot(c, zk)

  ra, rb = jax.grad(reference, argnums=(0, 1))(a, b)
  np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gb, rb, rtol=1e-4, atol=1e-5)
  # And not the exact implicit gradient (the point of a phantom gradient is to skip it).
  jac = (1 - np.tanh(a @ z_star + b) ** 2)[:, None] * a
  exact_b = np.linalg.solve(np.eye(len(b)) - jac.T, c) * (1 - np.tanh(a @ z_star + b) ** 2)
  assert np.max(np.abs(gb - exact_b)) > 1e-2


def test_phantom_forward_is_an_early_exit_loop_and_never_differentiated():
  a, b = _linear_problem()
  solve = lambda b: fp.fixed_point(_linear_map, fp.Anderson(rtol=1e-6), b, (a, b),  # noqa: E731
                                   max_steps=50, adjoint=fp.Phantom()).value.sum()
  gradient = str(jax.make_jaxpr(jax.grad(solve))(b))
  assert "while" in gradient and "scan" not in gradient


def test_phantom_value_is_the_answer_when_the_map_fails_there():
  # T(1) = 0.5, T(0.5) = NaN: the solve stops as nonfinite and best-so-far answers 0.5.
  # The phantom step at that answer is NaN; the value must still be the answer.
  def fails_below(z, a):
    return jnp.where(z < 0.75, jnp.nan, a * z)

  z0, a = jnp.ones((1, 2)), jnp.float32(0.5)
  solve = lambda a, adjoint: fp.fixed_point(  # noqa: E731
      fails_below, fp.Picard(rtol=1e-6, best_so_far=True), z0, a, max_steps=6,
      adjoint=adjoint, per_sample=True)
  backprop = solve(a, fp.Backprop())
  assert int(backprop.status[0]) == fp.RESULTS.nonfinite
  np.testing.assert_array_equal(backprop.value, [[0.5, 0.5]])
  for adjoint in (fp.Phantom(), fp.Phantom(steps=3, damping=0.5)):
    np.testing.assert_array_equal(solve(a, adjoint).value, backprop.value)
    value, _ = jax.value_and_grad(lambda a: solve(a, adjoint).value.sum())(a)
    assert float(value) == 1.0


@pytest.mark.parametrize("cls", [fp.Picard, fp.Anderson])
def test_best_so_far_answers_with_the_lowest_residual(cls):
  # z -> -1.5 z + 1: the fixed point 0.4 repels; from 0.39 every Picard step is worse, so
  # the best evaluation is the first, T(0.39) = 0.415 (Anderson with m=1 is Picard).
  kw = dict(m=1) if cls is fp.Anderson else {}
  repelling = lambda z, _: -1.5 * z + 1.0  # noqa: E731
  z0 = jnp.full((2,), 0.39)
  last = fp.fixed_point(repelling, cls(rtol=1e-8, **kw), z0, max_steps=6)
  best = fp.fixed_point(repelling, cls(rtol=1e-8, best_so_far=True, **kw), z0, max_steps=6)
  assert int(best.status) == int(last.status) == fp.RESULTS.max_steps_reached
  np.testing.assert_allclose(best.value, 0.415, rtol=1e-6)
  history = np.asarray(best.residual_history)
  assert float(best.residual) == pytest.approx(np.nanmin(history))
  assert float(last.residual) == pytest.approx(history[-1]) and history[-1] > history[0]
  # A solve that converges answers as without the option.
  a, b = _linear_problem()
  plain = fp.fixed_point(_linear_map, cls(rtol=1e-6, **kw), b, (a, b), max_steps=300)
  tracked = fp.fixed_point(_linear_map, cls(rtol=1e-6, best_so_far=True, **kw), b, (a, b),
                           max_steps=300)
  np.testing.assert_array_equal(plain.value, tracked.value)


# ------------------------------------------------------------------ loop structure


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (jit, custom_jvp, loops)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      if hasattr(param, "jaxpr"):
        yield from _equations(getattr(param.jaxpr, "jaxpr", param.jaxpr))


def _while_body(solver, batch, shape=(6, 5, 3)):
  """The body jaxpr of the early-exit loop of a per-sample solve of a batch of maps."""
  z0 = jnp.zeros((batch,) + shape)
  jaxpr = jax.make_jaxpr(lambda z: fp.fixed_point(
      lambda z, _: 0.5 * z + 1.0, solver, z, max_steps=7, per_sample=True))(z0)
  loops = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "while"]
  assert len(loops) == 1
  return loops[0].params["body_jaxpr"].jaxpr, z0.shape


def _count_maps(avals, shape):
  return sum(tuple(a.shape) == shape for a in avals)


@pytest.mark.parametrize("solver, batch, carried, selects", [
    (fp.Picard(), 1, 1, 0), (fp.Picard(), 2, 1, 1),
    (fp.Picard(best_so_far=True), 1, 2, 0), (fp.Picard(best_so_far=True), 2, 2, 2),
    (fp.Anderson(), 1, 2, 0), (fp.Anderson(), 2, 2, 2)],
    ids=["picard-1", "picard-2", "picard-best-1", "picard-best-2", "anderson-1", "anderson-2"])
def test_loop_carries_and_rewrites_only_the_maps_it_needs(solver, batch, carried, selects):
  # Picard's next point is its last evaluation, so the iterate is carried once; a batch of
  # one runs only while its sample is active, so nothing is frozen by a whole-map select,
  # and Picard's best evaluation, usually x itself, is copied aside only when x worsens.
  body, shape = _while_body(solver, batch)
  assert _count_maps([v.aval for v in body.invars], shape) == carried
  rewrites = [e for e in _equations(body) if e.primitive.name == "select_n"
              and tuple(e.outvars[0].aval.shape) == shape]
  assert len(rewrites) == selects


@pytest.mark.parametrize("solver", [
    fp.Picard(rtol=1e-4, unroll=1), fp.Picard(rtol=1e-4, unroll=1, best_so_far=True),
    fp.Anderson(rtol=1e-4, unroll=1), fp.Anderson(m=2, rtol=1e-4, unroll=1, best_so_far=True)],
    ids=["picard", "picard-best", "anderson", "anderson-best"])
@pytest.mark.parametrize("case, steps, picard_status", [
    ("block", 40, fp.RESULTS.successful), ("block", 3, fp.RESULTS.max_steps_reached),
    ("cycle", 30, fp.RESULTS.max_steps_reached), ("exp", 30, fp.RESULTS.nonfinite)],
    ids=["converges", "max-steps", "stalls", "diverges"])
def test_one_sample_loop_matches_the_masked_scan_bit_for_bit(solver, case, steps, picard_status):
  # The early-exit loop of a single sample skips the freezing selects (and keeps Picard's
  # best evaluation lazily); the masked scan (what Backprop differentiates) keeps them and
  # runs all steps, freezing the sample once it stops. Both must give the same answer,
  # status and step count to the bit. The residuals may differ in the last bit: where XLA
  # fuses the evaluation into the residual's sums instead of storing it (small maps, as
  # here), it may round them differently.
  g0 = 0.5 * jax.random.normal(jax.random.key(7), (1, 8, 8, 4))
  if case in ("block", "cycle"):  # With gain 0.3 Picard's residual stalls and wanders.
    graphdef, state = _tiny_block(gain=0.1 if case == "block" else 0.3)
    t_map, f_state = nnx.merge(graphdef, state).map_fn()
    args = (g0, f_state)
  else:  # exp(z) = z has no real solution; Picard overflows within a few steps.
    t_map, args = (lambda z, _: jnp.exp(z)), None

  def solve(g0, differentiable):
    return solver._run(t_map, g0, args, steps, differentiable=differentiable)

  loop = jax.jit(lambda g: solve(g, False))(g0)
  scan = jax.jit(lambda g: solve(g, True))(g0)
  if isinstance(solver, fp.Picard):
    assert int(loop.status[0]) == picard_status
  for got, want in zip(loop[:3], scan[:3]):  # value, status, num_steps
    np.testing.assert_array_equal(got, want)
  for got, want in zip(loop[3:], scan[3:]):  # residual, history
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unroll_true_is_not_taken_for_one():
  """True == 1 and hash(True) == hash(1): a config or solver holding True shared the
  compiled program of one holding 1 (a rolled loop). Both now hold distinct values."""
  assert minet_jax.ModelConfig(unroll=True).unroll == "full"
  assert minet_jax.ModelConfig(unroll=True) != minet_jax.ModelConfig(unroll=1)
  assert minet_jax.ModelConfig(unroll=False).unroll == 1
  for solver in (fp.Unrolled, fp.Picard, fp.Anderson):
    assert solver(unroll=True) != solver(unroll=1) and solver(unroll=True).unroll == "full"
  assert fp.resolve_unroll("full", 8) is True and fp.resolve_unroll(1, 8) == 1
  with pytest.raises(ValueError, match="unroll must be"):
    fp.Picard(unroll="fast")


def test_anderson_backprop_stays_exact_below_float32_rounding():
  """Asked for a tolerance float32 can barely meet (rtol 1e-8), Anderson keeps fitting its
  weights to residuals of pure rounding noise; differentiating that ill-posed fit gave
  gradients off by a factor of 1e8 (the forward value was right)."""
  rng = np.random.default_rng(0)
  w1, w2 = (jnp.asarray(rng.normal(size=(6, 6)) * 0.4, jnp.float32) for _ in range(2))
  g0 = jnp.asarray(rng.normal(size=(1, 6)) * 0.1, jnp.float32)
  c = jnp.asarray(rng.normal(size=(1, 6)), jnp.float32)

  def t_map(z, args):
    return args[2] + jnp.tanh(z @ args[0].T) @ args[1].T

  def unrolled(args):
    z = args[2]
    for _ in range(300):
      z = t_map(z, args)
    return jnp.sum(c * z)

  def solved(args):
    result = fp.fixed_point(t_map, fp.Anderson(rtol=1e-8, unroll=1), args[2], args,
                            max_steps=300, per_sample=True, adjoint=fp.Backprop())
    return jnp.sum(c * result.value)

  want = jax.grad(unrolled)((w1, w2, g0))
  got = jax.grad(solved)((w1, w2, g0))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))
