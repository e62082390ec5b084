"""Training checkpoints with orbax: periodic (resume) and best by validation PSNR.

A training workdir holds::

  config.json            the full training config of the latest start
  minet_config.json      the model config, as `minet_jax.save` writes it
  checkpoints/<step>/    the latest `keep` checkpoints, for resuming:
      state/             parameters, Adam moments, step, PRNG key
      params/            the weights alone, in `minet_jax.save`'s format
      data/              the input pipeline's iterator state (JSON)
      meta/              step, wall time and the last validation scores (JSON)
  best/<step>/           params/ and meta/ of the best validation PSNR so far

so ``minet_jax.load(workdir)`` (and ``evaluate.py --ckpt workdir``) rebuild the
model from ``minet_config.json`` and the best (else latest) ``params/``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from minet_jax import api
from minet_jax.train.state import TrainState, state_from_pure, state_to_pure

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
TRAIN_CONFIG_FILE = "config.json"
_LATEST_ITEMS = ("state", "params", "data", "meta")
_BEST_ITEMS = ("params", "meta")


def _steps(folder: pathlib.Path) -> list[int]:
  """Finalised orbax step folders (orbax writes to a temporary name and renames)."""
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def find_params(workdir: str | pathlib.Path) -> pathlib.Path | None:
  """The ``params/`` folder of a training workdir's best, else latest, checkpoint."""
  workdir = pathlib.Path(workdir)
  for sub in (BEST_DIR, LATEST_DIR):
    for step in reversed(_steps(workdir / sub)):
      candidate = workdir / sub / str(step) / "params"
      if candidate.is_dir():
        return candidate
  return None


def recorded_checksum(params_dir: str | pathlib.Path) -> str | None:
  """The weights' SHA-256 saved beside a checkpoint's ``params/`` (in its meta), if any."""
  meta_file = pathlib.Path(params_dir).parent / "meta" / "metadata"
  try:
    return json.loads(meta_file.read_text()).get("weights_sha256")
  except (OSError, ValueError, AttributeError):
    return None


def is_workdir(path: str | pathlib.Path) -> bool:
  """Whether `path` looks like a training workdir (has checkpoint folders)."""
  path = pathlib.Path(path)
  return (path / LATEST_DIR).is_dir() or (path / BEST_DIR).is_dir()


def write_model_config(workdir: pathlib.Path, params_config: Any) -> None:
  """Writes ``minet_config.json`` in the format `minet_jax.load_config` reads."""
  meta = {"format_version": api.FORMAT_VERSION, "model": params_config.to_dict()}
  tmp = workdir / (api.CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(meta, indent=2) + "\n")
  tmp.replace(workdir / api.CONFIG_FILE)


def _json_ready(state: Any) -> Any:
  """Iterator states are dicts of numbers or JSON bytes (grain's DataLoader)."""
  if isinstance(state, bytes):
    return {"__bytes__": state.decode("utf-8")}
  return state


def _from_json(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return state["__bytes__"].encode("utf-8")
  return state


def _host_weights(state: TrainState) -> dict:
  return jax.tree.map(np.asarray, state.params().weights)


class Checkpoints:
  """The periodic and best-PSNR checkpoint managers of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, async_save: bool = True):
    workdir = pathlib.Path(workdir).absolute()
    self.workdir = workdir
    self.latest = ocp.CheckpointManager(
        workdir / LATEST_DIR, item_names=_LATEST_ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                             enable_async_checkpointing=async_save))
    self.best = ocp.CheckpointManager(
        workdir / BEST_DIR, item_names=_BEST_ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             best_fn=lambda m: m["psnr"], best_mode="max",
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, state: TrainState, data_state: Any, meta: dict) -> bool:
    """Saves a resumable checkpoint at ``state.step`` unless one exists; True if saved."""
    step = int(state.step)
    if step in self.latest.all_steps():
      return False
    weights = _host_weights(state)
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_pure(state)),
        params=ocp.args.StandardSave(weights),
        data=ocp.args.JsonSave(_json_ready(data_state)),
        meta=ocp.args.JsonSave({"step": step, **meta,
                                "weights_sha256": api.weights_checksum(weights)})))
    return True

  def best_psnr(self) -> float | None:
    """The validation PSNR of the best checkpoint so far (None before the first)."""
    step = self.best.latest_step()
    if step is None:
      return None
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return float(meta.meta["psnr"])

  def save_best(self, state: TrainState, scores: dict[str, float]) -> bool:
    """Keeps this step's weights if its validation PSNR beats the best so far."""
    best = self.best_psnr()
    step = int(state.step)
    if (best is not None and scores["psnr"] <= best) or step in self.best.all_steps():
      return False
    scores = {k: float(v) for k, v in scores.items()}
    weights = _host_weights(state)
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(weights),
        meta=ocp.args.JsonSave({"step": step, **scores,
                                "weights_sha256": api.weights_checksum(weights)})),
        metrics=scores)
    return True

  def restore(self, like: TrainState, sharding: Any = None,
              step: int | None = None) -> tuple[TrainState, Any, dict]:
    """(state, data iterator state, meta) of the latest (or given) checkpoint.

    Args:
      like: a (possibly abstract) state giving the structure, shapes and graph.
      sharding: where to place the restored arrays (e.g. replicated over a mesh).
    """
    step = self.latest.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.workdir / LATEST_DIR}")

    def target(x):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    pure = jax.tree.map(target, state_to_pure(like))
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(pure), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    state = state_from_pure(like, restored.state)
    return state, _from_json(restored.data), dict(restored.meta)

  def wait(self) -> None:
    """Blocks until every pending (asynchronous) save is on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
