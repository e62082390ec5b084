"""The strip-wise forward (minet_jax.core.strips): exact, and bounded in memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minet_jax
from minet_jax.core import strips
from minet_jax.core.config import ModelConfig


def test_strips_equal_the_whole_image_forward(random_params):
  # Random weights of the released architecture; 201x299 is padded to 202x300, cut
  # into 7 strips of 32 rows (the last overlapping its neighbour), so top and bottom
  # borders, interior seams and the overlap are all exercised; two different images
  # check that statistics stay per sample.
  params = random_params()
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 201, 299, 3)).astype(np.float32)
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
  for bad in (-2, 2.5, True):
    with pytest.raises(ValueError, match="strip_rows"):
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
