"""Stable training on the released weights: a short self-distillation on one crop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minet_jax.stability import contractive
from minet_jax import metrics
from minet_jax.core.config import model_config
from minet_jax.core.params import Params, model_from_params
from minet_jax.train import state as state_lib
from minet_jax.train import step as step_lib
from configs import stable


def _radii(params: Params, image: jax.Array) -> np.ndarray:
  """rho(eta J) estimate of every block at its solution (60 power-iteration steps)."""
  model = model_from_params(params)
  runs = jax.jit(lambda x: model.solve_blocks(model.model_input(x)))(image)
  return np.array([float(contractive.block_radius(block, run.g0, run.result.value,
                                                  jax.random.key(i), 60)[0])
                   for i, (block, run) in enumerate(zip(model.im_blocks, runs))])


@pytest.mark.slow
def test_short_stable_fine_tune_contracts_and_moves_towards_the_teacher(released_params,
                                                                        shared_dir):
  # configs/stable.py on one crop: the released weights as stage blocks are contractions
  # where the released implicit Euler blocks are not, and a few steps of its training
  # bring the solved model's output towards the teacher's while they stay contractions.
  crop = np.load(shared_dir / "parity" / "official_outputs.npz")["crop_input_rgb"]
  hazy = jnp.asarray(crop[None, :64, :96] / 255.0, jnp.float32)
  config = stable.get_config()
  cfg = model_config(config.model)
  assert cfg.same_architecture(dataclasses.replace(released_params.config,
                                                   stage_fraction=cfg.stage_fraction))
  released = _radii(released_params, hazy)
  assert released.max() > 1.0, released  # block 2 expands on this crop
  start = Params(weights=released_params.weights, config=cfg)
  before = _radii(start, hazy)
  assert before.max() < 1.0, before

  config.optimizer.schedule = "constant"
  state = state_lib.create_train_state(config, params=start)
  train_step = step_lib.make_train_step(
      config.loss, teacher=released_params, match_weight=config.teacher_match_weight,
      output_weight=config.output_weight, match_steps=config.teacher_match_steps)
  mismatch = []
  for _ in range(12):
    state, m = train_step(state, {"hazy": hazy, "clear": hazy})
    mismatch.append(float(m["fixed_point_mismatch"]))
  trained = state.params()
  assert np.mean(mismatch[-3:]) < 0.9 * np.mean(mismatch[:3]), mismatch
  after = _radii(trained, hazy)
  assert after.max() < 1.0, after

  teacher_out = np.clip(np.asarray(model_from_params(released_params)(hazy)), 0, 1) * 255
  def psnr(params):
    out = np.clip(np.asarray(model_from_params(params)(hazy)), 0, 1) * 255
    return float(metrics.psnr(out, teacher_out).mean())
  assert psnr(trained) > psnr(start) + 0.3, (psnr(start), psnr(trained))


def test_apply_and_dehaze_report_how_the_blocks_were_solved(random_params, tmp_path, capsys):
  import minet_jax
  from minet_jax import dehaze, image_io
  from minet_jax.core import fixed_point as fp
  from minet_jax.core.api import describe_solves
  cfg = minet_jax.ModelConfig(features=4, pre_blocks=0, iterations=(12, 12, 12),
                              solver="picard", rtol=1e-2)
  params = state_lib.shrink_blocks(random_params(cfg), (0.05, 0.05, 0.05))
  image = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
  whole, strips_ = [], []
  out = minet_jax.apply(params, image, strip_rows=0, solves=whole)
  out_strips = minet_jax.apply(params, image, strip_rows=8, solves=strips_)
  np.testing.assert_allclose(out, minet_jax.apply(params, image), atol=1e-6)
  np.testing.assert_allclose(out_strips, out, atol=1e-4)
  assert len(whole) == len(strips_) == 3
  for a, b in zip(whole, strips_):
    assert isinstance(a, fp.SolveSummary)
    np.testing.assert_array_equal(a.status, [fp.RESULTS.successful])
    assert 1 <= int(a.num_steps[0]) < 12 and float(a.residual[0]) <= 1e-2
    np.testing.assert_array_equal(a.num_steps, b.num_steps)
  line = describe_solves(whole, params.config)
  assert line.startswith("picard to rtol 0.01: ") and line.endswith("all converged")
  capped = params.replace_config(iterations=(1, 1, 1), rtol=1e-9)
  missed = []
  minet_jax.apply(capped, image, solves=missed)
  assert "max_steps_reached" in describe_solves(missed, capped.config)

  minet_jax.save(params, tmp_path / "ckpt")
  image_io.write_png(tmp_path / "in.png", image)
  assert dehaze.main([str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--ckpt",
                      str(tmp_path / "ckpt"), "--no-progress"]) == 0
  assert "in.png: IM-blocks picard to rtol 0.01: " in capsys.readouterr().out
