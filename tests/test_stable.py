"""Stable training on the released weights: a short self-distillation on one crop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minet_jax import contractive, metrics
from minet_jax.config import model_config
from minet_jax.params import Params, model_from_params
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
  config.model = stable.default.section(dataclasses.replace(
      released_params.config, **{k: config.model[k] for k in (
          "solver", "rtol", "best_so_far", "backward", "contractive_weight", "contractive_kind",
          "contractive_point", "contractive_target", "contractive_iters")},
      iterations=(20, 20, 20)))
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
  print("rho before", before, "after", after)
  assert after.max() < min(before.max(), 1.0), (before, after)
  out = model_from_params(trained)(hazy)
  psnr = float(metrics.psnr(np.clip(np.asarray(out), 0, 1) * 255,
                            np.clip(np.asarray(teacher_out), 0, 1) * 255).mean())
  start_out = model_from_params(start)(hazy)
  start_psnr = float(metrics.psnr(np.clip(np.asarray(start_out), 0, 1) * 255,
                                  np.clip(np.asarray(teacher_out), 0, 1) * 255).mean())
  print("PSNR to the teacher: start", start_psnr, "trained", psnr)
  assert psnr > max(start_psnr - 1.0, 20.0), (start_psnr, psnr)
