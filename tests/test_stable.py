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
from minet_jax.train import defaults
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
def test_short_stable_fine_tune_lowers_rho_and_stays_near_the_teacher(released_params,
                                                                      shared_dir):
  crop = np.load(shared_dir / "parity" / "official_outputs.npz")["crop_input_rgb"]
  hazy = jnp.asarray(crop[None, :64, :96] / 255.0, jnp.float32)
  config = stable.get_config()
  config.model = defaults.section(dataclasses.replace(
      released_params.config, **{k: config.model[k] for k in (
          "solver", "rtol", "best_so_far", "backward", "contractive_weight", "contractive_kind",
          "contractive_point", "contractive_target", "contractive_iters")},
      iterations=(20, 20, 20)))
  config.model.contractive_iters = 12
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  start = state_lib.shrink_blocks(
      Params(weights=released_params.weights, config=model_config(config.model)),
      (0.7, 1.0, 1.0))
  teacher_out = model_from_params(released_params)(hazy)
  before = _radii(start, hazy)
  assert before.max() > 1.0, before  # not yet a contraction everywhere

  state = state_lib.create_train_state(config, params=start)
  train_step = step_lib.make_train_step("mse", teacher=released_params)
  for _ in range(15):
    state, m = train_step(state, {"hazy": hazy, "clear": hazy})
  trained = state.params()
  after = _radii(trained, hazy)
  # The block that is no contraction (block 2, rho ~1.14 on this crop) moves towards one.
  worst = int(np.argmax(before))
  assert before[worst] > 1.0 and after[worst] < before[worst] - 0.02, (before, after)
  assert after.max() < before.max(), (before, after)
  out = model_from_params(trained)(hazy)
  psnr = float(metrics.psnr(np.clip(np.asarray(out), 0, 1) * 255,
                            np.clip(np.asarray(teacher_out), 0, 1) * 255).mean())
  start_out = model_from_params(start)(hazy)
  start_psnr = float(metrics.psnr(np.clip(np.asarray(start_out), 0, 1) * 255,
                                  np.clip(np.asarray(teacher_out), 0, 1) * 255).mean())
  assert psnr > max(start_psnr - 1.0, 20.0), (start_psnr, psnr)


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
