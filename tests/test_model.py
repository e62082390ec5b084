"""Architecture: parameter counts, layer semantics, the IM-block iteration, parity."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax.core import layers
from minet_jax.core.params import param_shapes
from minet_jax.core.model import IMBlock, MINet, combined
from minet_jax.convert.torch_names import (torch_name_table, torch_state_dict_from_weights,
                                   weights_from_torch_state_dict)

TINY = minet_jax.ModelConfig(features=8, iterations=(2, 3, 2))


def test_released_parameter_count_is_the_papers():
  assert sum(np.prod(s) for s in param_shapes(minet_jax.ModelConfig()).values()) == 628_078


def test_paper_text_variant_parameter_count():
  # 9x9 instead of 7x7 shared kernels in the last block: 2 * (81 - 49) more.
  assert sum(np.prod(s) for s in param_shapes(minet_jax.paper_text_variant()).values()) == 628_142


def test_initialisation_follows_the_authors():
  params = minet_jax.init(seed=3)
  w = params.weights
  # Shared smoothing kernels start as the identity.
  k = np.asarray(w["im_blocks"]["2"]["f"]["pre_conv1"]["kernel"])
  expected = np.zeros((7, 7), np.float32)
  expected[3, 3] = 1
  np.testing.assert_array_equal(k, expected)
  # kaiming_normal_(w, a=0.1): std = sqrt(2 / (1 + 0.01) / fan_in), fan_in = 64 * 9.
  kernel = np.asarray(w["pre_processing"]["0"]["conv1"]["kernel"])
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / 1.01 / 576), rtol=0.03)
  np.testing.assert_array_equal(np.asarray(w["norm1"]["scale"]), np.ones(64))


def test_name_table_is_a_bijection_onto_parameters():
  for cfg in (minet_jax.ModelConfig(), minet_jax.paper_text_variant(), TINY):
    table = torch_name_table(cfg)
    assert set(table) == set(param_shapes(cfg))
    assert len({name for name, _ in table.values()}) == len(table)


def test_name_table_matches_the_released_checkpoint(shared_dir):
  sd = dict(np.load(shared_dir / "weights" / "minet_its_official_state_dict.npz"))
  cfg = minet_jax.ModelConfig()
  assert {name for name, _ in torch_name_table(cfg).values()} == set(sd)
  weights = weights_from_torch_state_dict(sd, cfg, param_shapes(cfg))
  back = torch_state_dict_from_weights(weights, cfg)
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_state_dict_mismatch_names_every_tensor(random_params):
  cfg = TINY
  sd = torch_state_dict_from_weights(random_params(cfg).weights, cfg)
  sd["module.extra.weight"] = np.zeros(3)
  del sd["gate.bias"]
  sd["conv1.weight"] = np.zeros((8, 3, 5, 5), np.float32)
  with pytest.raises(ValueError) as info:
    weights_from_torch_state_dict(sd, cfg, param_shapes(cfg))
  message = str(info.value)
  assert "missing: gate.bias" in message
  assert "unexpected: extra.weight" in message
  assert "shape mismatch: conv1.weight" in message


def _torch_conv_transpose(x, w, stride, padding):
  """Direct definition: each input pixel scatters w[i, o] into the output."""
  n, h, wd, cin = x.shape
  _, cout, k, _ = w.shape
  full = np.zeros((n, (h - 1) * stride + k, (wd - 1) * stride + k, cout))
  for i in range(h):
    for j in range(wd):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += np.einsum(
          "nc,cokl->nklo", x[:, i, j, :], w)
  return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding, :]


@pytest.mark.parametrize("kernel_size,stride,padding", [
    (4, 2, 1),   # the released deconv3: sub-pixel (four 2x2 convs)
    (2, 2, 0),   # sub-pixel, 1x1 phases
    (5, 3, 1),   # sub-pixel, stride 3
    (3, 2, 1),   # output 2H - 1: the dilated-conv path
])
def test_conv_transpose_matches_the_scatter_definition(kernel_size, stride, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  w_torch = rng.normal(size=(3, 2, kernel_size, kernel_size)).astype(np.float32)  # (in, out, k, k)
  layer = layers.ConvTranspose2d(3, 2, kernel_size, stride=stride, padding=padding,
                                 rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.asarray(np.transpose(w_torch, (2, 3, 0, 1))[::-1, ::-1])
  layer.bias[...] = jnp.zeros(2)
  assert layer.sub_pixel == (kernel_size - 2 * padding == stride)
  want = _torch_conv_transpose(x, w_torch, stride, padding)
  np.testing.assert_allclose(layer(jnp.asarray(x)), want, atol=1e-5)

  # Gradients (the layer is linear in x and in the kernel): <grad, v> = <g, layer(v)>,
  # with layer(v) from the scatter definition.
  g = rng.normal(size=want.shape).astype(np.float32)
  v = rng.normal(size=x.shape).astype(np.float32)
  u = rng.normal(size=w_torch.shape).astype(np.float32)
  model_grads = nnx.grad(lambda m, x: jnp.sum(m(x) * g), argnums=(0, 1))(layer, jnp.asarray(x))
  grad_kernel = np.asarray(model_grads[0]["kernel"][...])[::-1, ::-1].transpose(2, 3, 0, 1)
  np.testing.assert_allclose(np.vdot(model_grads[1], v),
                             np.vdot(g, _torch_conv_transpose(v, w_torch, stride, padding)),
                             rtol=1e-4)
  np.testing.assert_allclose(np.vdot(grad_kernel, u),
                             np.vdot(g, _torch_conv_transpose(x, u, stride, padding)), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (1, 1)])
def test_conv_1x1_matches_a_reference_convolution(dtype, use_bias, stride, padding):
  """A 1x1 conv (a matrix product over channels when stride 1, unpadded) is the conv."""
  conv = layers.Conv2d(16, 3, 1, stride=stride, padding=padding, use_bias=use_bias,
                       dtype=dtype, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 11, 16))
  want = np.asarray(jax.lax.conv_general_dilated(
      x, conv.kernel[...], (stride, stride),
      ((padding, padding),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST), np.float64)
  if use_bias:
    want = want + np.asarray(conv.bias[...], np.float64)
  got = conv(x)
  assert got.dtype == jnp.dtype(dtype) and got.shape == want.shape
  tolerance = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance)


def test_instance_norm_matches_numpy():
  x = np.random.default_rng(1).normal(2.0, 3.0, size=(2, 6, 7, 4)).astype(np.float32)
  norm = layers.InstanceNorm(4)
  norm.scale[...] = jnp.arange(1.0, 5.0)
  norm.bias[...] = jnp.full(4, 0.5)
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)  # biased, as PyTorch
  expected = (x - mean) / np.sqrt(var + 1e-5) * np.arange(1.0, 5.0) + 0.5
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, atol=1e-5)


def _smoothing_definition(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  k = kernel.shape[0]
  p = (k - 1) // 2
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return sum(kernel[a, b] * padded[:, a:a + h, b:b + w, :] for a in range(k) for b in range(k))


def test_shared_separable_conv_applies_one_kernel_to_every_channel():
  x = np.random.default_rng(2).normal(size=(1, 9, 9, 3)).astype(np.float32)
  conv = layers.ShareSepConv(3)
  np.testing.assert_array_equal(conv(jnp.asarray(x)), x)  # identity at init
  kernel = np.random.default_rng(3).normal(size=(3, 3)).astype(np.float32)
  conv.kernel[...] = jnp.asarray(kernel)
  np.testing.assert_allclose(conv(jnp.asarray(x)), _smoothing_definition(x, kernel), atol=1e-5)


@pytest.mark.parametrize("k,shape", [(3, (2, 6, 9, 4)), (7, (1, 9, 37, 3)), (7, (2, 5, 3, 2))])
def test_shared_smoothing_derivatives(k, shape):
  """The custom JVP (banded-matrix tangents) against the definition, in every mode.

  Bilinear map S(x, K): reverse mode must satisfy <grad_x, v> = <g, S(v, K)> and
  <grad_K, U> = <g, S(x, U)>; forward mode must equal S(v, K) + S(x, U); and the
  reverse-over-forward derivative the contractivity penalty takes must equal
  autodiff of the plain shifted sum. Widths 37 and 3 leave partial column blocks.
  """
  rng = np.random.default_rng(k)
  x, g, v = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  kernel, u = (rng.normal(size=(k, k)).astype(np.float32) for _ in range(2))
  gx, gk = jax.grad(lambda x, k_: jnp.sum(layers.shared_smoothing(x, k_) * g),
                    argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(np.vdot(gx, v), np.vdot(g, _smoothing_definition(v, kernel)),
                             rtol=1e-4)
  np.testing.assert_allclose(np.vdot(gk, u), np.vdot(g, _smoothing_definition(x, u)), rtol=1e-4)
  _, tangent = jax.jvp(layers.shared_smoothing, (jnp.asarray(x), jnp.asarray(kernel)),
                       (jnp.asarray(v), jnp.asarray(u)))
  np.testing.assert_allclose(tangent, _smoothing_definition(v, kernel) +
                             _smoothing_definition(x, u), atol=1e-4)

  def jvp_norm(fn):
    return lambda k_: jnp.sum(jax.jvp(lambda z: fn(z, k_), (jnp.asarray(x),),
                                      (jnp.asarray(v),))[1] ** 2)
  np.testing.assert_allclose(jax.grad(jvp_norm(layers.shared_smoothing))(jnp.asarray(kernel)),
                             jax.grad(jvp_norm(layers._shifted_sum))(jnp.asarray(kernel)),
                             rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("unroll", [1, 2, True])
def test_im_block_scan_equals_a_python_loop(unroll):
  cfg = minet_jax.ModelConfig(features=4, iterations=(5,), dilations=(2,), eta=0.7, unroll=unroll)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.pre_conv1.kernel[...] = jax.random.normal(jax.random.key(1), (3, 3)) * 0.3
  g0 = jax.random.normal(jax.random.key(2), (2, 10, 12, 4))
  g = g0
  for _ in range(5):
    g = g0 + 0.7 * block.f(g)
  result = block.solve(g0)
  np.testing.assert_allclose(result.value, g, rtol=1e-5, atol=1e-5)
  chex.assert_shape(result.residual_history, (2, 5))  # per sample, per step
  np.testing.assert_array_equal(result.num_steps, [5, 5])


def test_a_stage_fraction_block_solves_its_stage_and_answers_the_whole_step():
  # A one-stage implicit Runge-Kutta step (c = a11 = s, b = 1): the stage k solves
  # k = g0 + s * eta * f(k), and the block answers g0 + eta * f(k).
  s, eta = 0.4, 0.7
  cfg = minet_jax.ModelConfig(features=4, iterations=(200,), dilations=(2,), eta=eta,
                              stage_fraction=s, solver="picard", rtol=1e-7)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.norm2.scale[...] = block.f.norm2.scale[...] * 0.2  # a contraction: Picard converges
  g0 = jax.random.normal(jax.random.key(2), (2, 6, 7, 4))
  result = block.solve(g0)
  np.testing.assert_array_equal(result.status, [0, 0])
  k = result.value
  np.testing.assert_allclose(k, g0 + s * eta * block.f(k), rtol=1e-5, atol=1e-6)
  answer = block(g0)
  np.testing.assert_allclose(answer, g0 + eta * block.f(k), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(block.stage_of(g0, answer), k, rtol=1e-5, atol=1e-6)
  # The solved map's Jacobian, Theorem 1's J, is s times the implicit Euler map's.
  t_map, state = block.map_fn()
  one = (g0[:1], k[:1])
  stage_jac = jax.jacfwd(lambda g: t_map(g, (one[0], state)))(one[1])
  euler_jac = jax.jacfwd(lambda g: one[0] + eta * block.f(g))(one[1])
  np.testing.assert_allclose(stage_jac, s * euler_jac, rtol=1e-5, atol=1e-7)
  # In bfloat16 the block takes the step itself: the extrapolation would magnify the
  # stage's rounding by 1/s.
  narrow = IMBlock(dataclasses.replace(cfg, dtype="bfloat16"), 0, rngs=nnx.Rngs(0))
  k16 = k.astype(jnp.bfloat16)
  np.testing.assert_array_equal(narrow.output(g0.astype(jnp.bfloat16), k16),
                                g0.astype(jnp.bfloat16) + eta * narrow.f(k16))
  # Implicit Euler (the default) answers with the stage itself.
  euler = IMBlock(minet_jax.ModelConfig(features=4, iterations=(3,), dilations=(2,)), 0,
                  rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(euler(g0), euler.solve(g0).value)


def test_a_two_stage_block_solves_both_stages_of_its_sdirk_step():
  # Stiffly accurate two-stage SDIRK (A = [[G, 0], [1 - G, G]], b = A's last row):
  # k1 = g0 + G eta f(k1), y = g0 + (1 - G) eta f(k1) + G eta f(y); the answer is y.
  gamma, eta = 0.4, 0.7
  cfg = minet_jax.ModelConfig(features=4, iterations=(200,), dilations=(2,), eta=eta,
                              stage_fraction=gamma, stages=2, solver="picard", rtol=1e-7)
  block = IMBlock(cfg, 0, rngs=nnx.Rngs(0))
  block.f.norm2.scale[...] = block.f.norm2.scale[...] * 0.2  # a contraction: Picard converges
  g0 = jax.random.normal(jax.random.key(2), (2, 6, 7, 4))
  solve_stages = nnx.jit(lambda b, g: b.solve_stages(g))  # one compiled program per block
  (base1, first), (base2, second) = solve_stages(block, g0)
  k1, y = first.value, second.value
  np.testing.assert_array_equal(base1, g0)
  np.testing.assert_allclose(k1, g0 + gamma * eta * block.f(k1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(base2, g0 + (1 - gamma) * eta * block.f(k1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, base2 + gamma * eta * block.f(y), rtol=1e-5, atol=1e-6)
  # Not the one-stage answer it starts from.
  assert float(jnp.max(jnp.abs(y - (g0 + eta * block.f(k1))))) > 1e-2
  np.testing.assert_array_equal(block.output(g0, y), y)
  # One result for the block (`IMBlock.solve`): both stages' steps, the worse status and
  # residual, both histories.
  result = combined([first, second])
  np.testing.assert_array_equal(result.value, y)
  np.testing.assert_array_equal(result.num_steps, first.num_steps + second.num_steps)
  np.testing.assert_array_equal(result.status, [0, 0])
  np.testing.assert_array_equal(result.residual, jnp.maximum(first.residual, second.residual))
  chex.assert_shape(result.residual_history, (2, 400))
  for b in range(2):  # each sample's stage-2 residuals right after its stage-1 ones
    n1, n2 = int(first.num_steps[b]), int(second.num_steps[b])
    np.testing.assert_array_equal(result.residual_history[b, :n1],
                                  first.residual_history[b, :n1])
    np.testing.assert_array_equal(result.residual_history[b, n1:n1 + n2],
                                  second.residual_history[b, :n2])
    assert bool(jnp.all(jnp.isnan(result.residual_history[b, n1 + n2:])))
  # A block run of the model records every stage's (base, solution).
  model = MINet(dataclasses.replace(TINY, pre_blocks=0, stages=(1, 2, 1),
                                    stage_fraction=(1.0, 0.5, 1.0), solver="picard",
                                    iterations=(200, 200, 200), rtol=1e-6), rngs=nnx.Rngs(0))
  runs = nnx.jit(lambda m, x: m.solve_blocks(m.model_input(x)))(
      model, jax.random.uniform(jax.random.key(3), (1, 12, 14, 3)))
  assert [len(run.points) for run in runs] == [1, 2, 1]
  (g0_2, k1_2), (c_2, y_2) = runs[1].points
  np.testing.assert_array_equal(g0_2, runs[0].output)
  np.testing.assert_array_equal(y_2, runs[1].output)
  # stage_points rebuilds the stages from the block's input and answer (c from f itself:
  # equal to the solve's extrapolated c to the stage's tolerance).
  (sp_g0, sp_k1), (sp_c, sp_y) = nnx.jit(lambda b, g, y: b.stage_points(g, y))(
      model.im_blocks[1], g0_2, y_2)
  np.testing.assert_allclose(sp_k1, k1_2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sp_c, c_2, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(sp_y, y_2)
  with pytest.raises(ValueError, match="stage_points"):
    model.im_blocks[1].stage_of(g0_2, y_2)
  # In bfloat16 the second base is computed from f itself, not from (k1 - g0) / G, and
  # the step stays close to float32's.
  narrow = IMBlock(dataclasses.replace(cfg, dtype="bfloat16"), 0, rngs=nnx.Rngs(0))
  narrow.f.norm2.scale[...] = block.f.norm2.scale[...]
  g16 = g0.astype(jnp.bfloat16)
  (_, first16), (base16, second16) = solve_stages(narrow, g16)
  k16 = first16.value
  assert base16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(base16, g16 + jnp.asarray(1 - gamma, jnp.bfloat16)
                                * (eta * narrow.f(k16)))
  error = jnp.linalg.norm(second16.value.astype(jnp.float32) - y) / jnp.linalg.norm(y)
  assert float(error) < 2e-2, float(error)


def test_a_two_stage_blocks_gradients_are_those_of_its_step_written_out():
  # The second stage's base c carries the first stage's solution: both backward modes
  # must hand c's cotangent back through stage 1, to g0 and to f. The reference is the
  # step written out as plain loops (k1 = g0 + G f(k1); y = c + G f(y)), differentiated.
  gamma = 0.5
  cfg = minet_jax.ModelConfig(features=3, pre_blocks=0, iterations=(60,), dilations=(1,),
                              stage_fraction=gamma, stages=2, solver="picard", rtol=1e-7,
                              unroll=1, adjoint_rtol=1e-7, adjoint_max_steps=400)
  g0 = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  weights = jax.random.normal(jax.random.key(2), g0.shape)

  def written_out(f, g):
    k1 = jax.lax.fori_loop(0, 80, lambda _, k: g + gamma * f(k), g)
    c = g + (1 - gamma) * f(k1)
    return jax.lax.fori_loop(0, 80, lambda _, y: c + gamma * f(y), c)

  for backward in ("backprop", "implicit"):
    block = IMBlock(dataclasses.replace(cfg, backward=backward), 0, rngs=nnx.Rngs(4))
    block.f.norm2.scale[...] = jnp.asarray([0.5, 1.0, 1.5], jnp.float32)  # a contraction
    graphdef, state = nnx.split(block)
    got = jax.grad(lambda st, g: jnp.sum(nnx.merge(graphdef, st)(g) * weights),
                   argnums=(0, 1))(state, g0)
    want = jax.grad(lambda st, g: jnp.sum(written_out(nnx.merge(graphdef, st).f, g) * weights),
                    argnums=(0, 1))(state, g0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    assert float(jnp.max(jnp.abs(got[1]))) > 0


@pytest.mark.parametrize("shape", [(1, 37, 53, 3), (2, 16, 20, 3), (1, 1, 1, 3), (3, 9, 2, 3)])
def test_forward_shapes_and_finiteness(shape):
  model = MINet(TINY, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), shape)
  y = model(x)
  chex.assert_shape(y, shape)
  chex.assert_tree_all_finite(y)


def test_samples_in_a_batch_are_independent():
  model = MINet(TINY, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 12, 14, 3))
  np.testing.assert_allclose(model(x)[1:], model(x[1:]), atol=1e-5)


def test_rgb01_input_format_feeds_the_image_unchanged():
  model = MINet(minet_jax.ModelConfig(features=4, iterations=(1,), dilations=(1,),
                                      input_format="rgb01"), rngs=nnx.Rngs(0))
  seen = []
  original = model.encode
  model.encode = lambda image: seen.append(image) or original(image)
  x = jax.random.uniform(jax.random.key(0), (1, 4, 6, 3))
  model(x)
  np.testing.assert_array_equal(seen[0], x)


def test_crop_parity_with_the_authors_outputs(shared_dir):
  """The released weights reproduce the authors' PyTorch output on a SOTS crop."""
  cfg = minet_jax.ModelConfig()
  sd = dict(np.load(shared_dir / "weights" / "minet_its_official_state_dict.npz"))
  params = minet_jax.Params(weights=weights_from_torch_state_dict(sd, cfg, param_shapes(cfg)),
                            config=cfg)
  ref = np.load(shared_dir / "parity" / "official_outputs.npz")
  x = ref["crop_input_rgb"] / 255.0
  out = np.asarray(minet_jax.model_from_params(params)(jnp.asarray(x[None])))[0] * 255.0
  expected = ref["crop_output_rgb"]
  psnr = 10 * np.log10(255.0**2 / np.mean((out - expected) ** 2))
  assert psnr >= 50.0, f"PSNR to the authors' output {psnr:.1f} dB, max |diff| {np.abs(out - expected).max()}"
