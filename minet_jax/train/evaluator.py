"""Validation during training: the model's PSNR/SSIM on the validation split.

Scores are `minet_jax.metrics.protocol_scores`, the SOTS protocol that
`minet_jax.evaluation` reports (0..255 scale, output clipped), here computed a
batch at a time with the model sharded over the training mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from minet_jax.core import api
from minet_jax import metrics
from minet_jax.train import sharding
from minet_jax.train.checks import ConfigError
from minet_jax.train.state import TrainState


def _predict_fn(mesh) -> Callable[[TrainState, jax.Array], jax.Array]:
  """Jitted state, NHWC [0, 1] -> dehazed NHWC clipped to [0, 1], replicated on every
  device (so every host can read all of it)."""

  def predict(state: TrainState, hazy: jax.Array) -> jax.Array:
    return api.dehaze_batch(state.params(), hazy)

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


class Evaluator:
  """PSNR/SSIM (SOTS protocol, 0..255 scale) of the model on a validation split."""

  def __init__(self, config: ml_collections.ConfigDict, source, mesh):
    from minet_jax.data import pipeline

    limit = int(config.data.num_eval_images) or None
    self.dataset = pipeline.eval_dataset(source, batch_size=int(config.data.eval_batch_size),
                                         limit=limit)
    self.mesh = mesh
    self.grid_images = int(config.grid_images)
    self.predict = _predict_fn(mesh)
    self.hazy_scores: dict[str, float] | None = None

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    try:
      yield from self.dataset
    except ValueError as e:
      if "different sizes" not in str(e):
        raise
      # A config error (one line from train.py), found at the first validation.
      raise ConfigError(f"{e}. The validation images differ in size: set "
                        "config.data.eval_batch_size=1") from e

  def __call__(self, state: TrainState) -> tuple[dict[str, float], list]:
    """(scores, grid rows): mean ``psnr``, ``ssim`` and the hazy input's, per image."""
    devices = self.mesh.devices.size
    psnrs, ssims, hazy_psnrs, hazy_ssims, rows = [], [], [], [], []
    for batch in self._batches():
      hazy, n = sharding.pad_to_multiple(batch["hazy"], devices)
      x = jax.device_put(hazy, sharding.batch_sharded(self.mesh))
      out = np.asarray(jax.device_get(self.predict(state, x)))[:n]
      clear = batch["clear"] * 255.0
      p, s = metrics.protocol_scores(out * 255.0, clear)
      psnrs.append(np.asarray(p))
      ssims.append(np.asarray(s))
      if self.hazy_scores is None:  # The input does not change between evaluations.
        p, s = metrics.protocol_scores(batch["hazy"] * 255.0, clear)
        hazy_psnrs.append(np.asarray(p))
        hazy_ssims.append(np.asarray(s))
      for i in range(min(n, self.grid_images - len(rows))):
        rows.append((batch["hazy"][i], out[i], batch["clear"][i]))
    if not psnrs:
      raise ValueError("the validation split is empty; check config.data.eval_split")
    if self.hazy_scores is None:
      self.hazy_scores = {"hazy_psnr": float(np.mean(np.concatenate(hazy_psnrs))),
                          "hazy_ssim": float(np.mean(np.concatenate(hazy_ssims)))}
    psnr = np.concatenate(psnrs)
    scores = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(np.concatenate(ssims))),
              **self.hazy_scores, "num_images": int(psnr.size)}
    scores["psnr_gain"] = scores["psnr"] - scores["hazy_psnr"]
    return scores, rows
