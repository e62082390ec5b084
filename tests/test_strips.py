"""The strip-wise forward (minet_jax.core.strips): exact, and bounded in memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minet_jax
from minet_jax.core import strips
from minet_jax.core.config import ModelConfig
from minet_jax.core.layers import Conv2d, InstanceNorm, ShareSepConv
from minet_jax.core.model import RELU, MINet


def test_strips_equal_the_whole_image_forward(random_params):
  # Random weights of the released architecture; 201x63 is padded to 202x64, cut
  # into 7 strips of 32 rows (the last overlapping its neighbour), so top and bottom
  # borders, interior seams and the overlap are all exercised (strips are cut along
  # rows only, so the width need not be large); two different images check that
  # statistics stay per sample.
  params = random_params()
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 201, 63, 3)).astype(np.float32)
  whole = np.asarray(minet_jax.apply(params, images, strip_rows=0))
  striped = np.asarray(minet_jax.apply(params, images, strip_rows=32))
  assert striped.shape == whole.shape
  assert np.abs(striped - whole).max() < 1e-4
  assert np.abs(whole[0] - whole[1]).max() > 0.1  # the two samples differ


def test_strips_under_an_enclosing_jit_and_any_strip_height(random_params):
  cfg = ModelConfig(features=8, pre_blocks=1, iterations=(2, 2, 2))
  params = random_params(cfg, seed=2)
  image = jnp.asarray(np.random.default_rng(1).uniform(size=(37, 50, 3)), jnp.float32)
  whole = np.asarray(minet_jax.apply(params, image, strip_rows=0))
  # Strips narrower than the halos; many strips, inside a caller's jit; one strip
  # (1000 rows are capped at the padded height, 38).
  for rows, wrap in ((1, False), (10, True), (1000, False)):
    apply = functools.partial(minet_jax.apply, strip_rows=rows)
    got = (jax.jit(apply) if wrap else apply)(params, image)
    np.testing.assert_allclose(np.asarray(got), whole, atol=1e-5)


def test_choice_of_strip_rows():
  assert strips.choose_strip_rows(460, 620) == 0  # small images: whole image
  assert strips.choose_strip_rows(1800, 2708) == 96  # 2^18 pixels per strip, even
  assert strips.choose_strip_rows(1800, 2708, 0) == 0
  assert strips.choose_strip_rows(460, 620, 31) == 32
  assert strips.choose_strip_rows(45, 620, 100) == 46
  for bad in (-2, 2.5, True, False):
    with pytest.raises(ValueError, match="strip_rows must be an integer >= 0"):
      strips.choose_strip_rows(460, 620, bad)


def test_memory_bound_at_2708x1800_from_compiled_analysis():
  # Compiled, not run: XLA's buffer assignment for the released architecture on a
  # 1800x2708 photo. The strip path's largest stage (the third IM-block: its input,
  # output and two temporaries, plus the first block's output kept for the fusion)
  # holds about five half-resolution 64-channel maps and no full-resolution one;
  # the whole-image program needs more even before the scratch it allocates
  # outside buffer assignment (8 GB of RSS in all).
  cfg = ModelConfig()
  shape = (1, 1800, 2708, 3)
  per_stage = strips.stage_memory(cfg, shape, strips.choose_strip_rows(1800, 2708))
  half_map = 900 * 1354 * 64 * 4
  assert max(per_stage.values()) <= 5.5 * half_map, per_stage
  assert max(per_stage, key=per_stage.get) in ("im_block_3", "pre_processing")

  params = jax.eval_shape(lambda: minet_jax.init(cfg))
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  forward = jax.jit(lambda p, x: minet_jax.model_from_params(p)(x))
  stats = forward.lower(params, image).compile().memory_analysis()
  whole = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  assert whole > 7.5 * half_map
  assert max(per_stage.values()) < 0.7 * whole


def test_progress_is_reported_after_every_stage(random_params):
  cfg = ModelConfig(features=8, pre_blocks=1, iterations=(1, 1, 1))
  params = random_params(cfg, seed=3)
  image = np.random.default_rng(2).uniform(size=(24, 20, 3)).astype(np.float32)
  calls = []
  got = minet_jax.apply(params, image, strip_rows=8, progress=lambda *a: calls.append(a))
  # Encoder, pre-processing, three IM-blocks, fusion, decoder, tail.
  assert calls == [(k, 8) for k in range(1, 9)]
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(minet_jax.apply(params, image, strip_rows=8)))
  calls.clear()
  minet_jax.apply(params, image, strip_rows=0, progress=lambda *a: calls.append(a))
  assert calls == [(1, 1)]
  # Asking for the solves too changes nothing of that.
  calls.clear()
  solves = []
  minet_jax.apply(params, image, strip_rows=0, progress=lambda *a: calls.append(a),
                  solves=solves)
  assert calls == [(1, 1)] and len(solves) == 3


class _Deeper(MINet):
  """MI-Net with layers added to its strip-run stages by changing `stages` alone: a 5x5
  conv dilated by 2 (reaching four rows) with a norm in the encoder, a random 5x5
  smoothing and a 3x3 conv with a norm in the decoder, at full resolution."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    c = cfg.features
    self.wide = Conv2d(c, c, 5, padding=4, dilation=2, use_bias=False, rngs=rngs)
    self.wide_norm = InstanceNorm(c)
    self.smooth = ShareSepConv(5)
    self.smooth.kernel[...] = jax.random.uniform(rngs.params(), (5, 5)) / 12.5
    self.extra = Conv2d(c, c, 3, padding=1, rngs=rngs)
    self.extra_norm = InstanceNorm(c)

  def stages(self):
    stages = super().stages()
    encoder, decoder = stages["encoder"], stages["decoder"]
    # After conv1-norm1-relu, and after deconv3-norm4-relu.
    stages["encoder"] = encoder[:3] + (self.wide, self.wide_norm, RELU) + encoder[3:]
    stages["decoder"] = (decoder[:3] + (self.smooth, self.extra, self.extra_norm, RELU)
                         + decoder[3:])
    return stages


def test_layers_added_to_the_stages_run_in_strips_exactly():
  cfg = ModelConfig(features=8, pre_blocks=1, iterations=(1, 1, 1))
  model = _Deeper(cfg, rngs=nnx.Rngs(0))
  released = MINet(cfg, rngs=nnx.Rngs(0))  # the same weights, without the added layers
  image = jnp.asarray(np.random.default_rng(4).uniform(size=(1, 37, 51, 3)), jnp.float32)
  graphdef, state = nnx.split(model)
  whole = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, image))
  # The whole-image forward runs the stages as written, added layers included.
  without = np.asarray(nnx.jit(lambda m, x: m(x))(released, image))
  assert float(np.abs(whole - without).max()) > 1e-2
  # Strips of 6 rows (3 half-resolution rows), 7 of them: every halo is wider than
  # a strip, and the encoder's needs more rows than the released model's.
  got = np.asarray(strips.forward(model, image, 6))
  np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_released_halos_follow_from_the_kernels():
  # Worked out by hand from the released layers, in rows of each stage's input.
  # Encoder: conv3 (3x3, stride 2, padding 1) makes half-resolution row o from
  # full-resolution rows 2o - 1 .. 2o + 1, so the half-resolution strip [o0, o1) reads
  # rows 2 * o0 - 1 .. 2 * o1 - 1, from 2 * o0 - 2 to keep its stride phase: 2 rows
  # above the strip's own rows [2 * o0, 2 * o1) and none below; conv2 and conv1 (3x3)
  # one more each.
  encoder = (2 + 1 + 1, 0 + 1 + 1)
  # Decoder, in half-resolution rows: deconv1 and the tail's 1x1 convs keep rows;
  # deconv2 (3x3) needs full-resolution rows r0 - 1 .. r1 for the strip [r0, r1), r0 and
  # r1 even; deconv3 (4x4, stride 2, padding 1) makes row o from half-resolution rows i
  # with 2i = o + 1 - t, t < 4: row r0 - 1 from i >= r0 / 2 - 1, row r1 from
  # i <= r1 / 2, one row beyond the strip's own rows [r0 / 2, r1 / 2) on each side.
  decoder = (1, 1)
  # Fusion: the gate is a 3x3 conv on half-resolution maps.
  fusion = (1, 1)
  stages = nnx.eval_shape(lambda: MINet(ModelConfig(), rngs=nnx.Rngs(0))).stages()
  assert strips.halo(stages["encoder"]) == encoder
  assert strips.halo(stages["decoder"]) == decoder
  assert strips.halo(stages["fusion"]) == fusion
  # The residual blocks and the tail's global pooling are not row-local: no halo.
  for name in ("pre_processing", "tail"):
    with pytest.raises(ValueError, match="whole map"):
      strips.halo(stages[name])
