"""Training checkpoints with orbax: periodic (resume) and best by validation PSNR.

A training workdir holds::

  config.json            the full training config of the latest start
  train.lock             while a run trains there: its lock (`minet_jax.train.lock`)
  minet_config.json      the model config, as `minet_jax.save` writes it, and the
                         folders of the weights in the order to load them
                         (``"weights_in": ["best", "checkpoints"]``)
  checkpoints/<step>/    the latest `keep` checkpoints, for resuming:
      state/             parameters, Adam moments, step, PRNG key
      params/            the weights alone, in `minet_jax.save`'s format
      data/              the input pipeline's iterator state (JSON)
      meta/              step, wall time, the last validation scores, the
                         architecture and the weights' SHA-256 (JSON)
  best/<step>/           params/ and meta/ of the best validation PSNR so far
  damaged_checkpoints/   checkpoints that failed to restore on resume, moved aside
                         (one saved with another optimizer state is refused instead:
                         `StateLayoutError`, nothing moved)
  diverged_checkpoints/  checkpoints whose state led to NaN or infinite values, moved
                         aside when training stopped on them

Nothing non-finite is ever saved: `Checkpoints.save` and `Checkpoints.save_best`
refuse NaN or infinite weights, optimizer moments or validation scores with
`NotFiniteError`, so every checkpoint on disk is one a run can continue from.

``minet_jax.load(workdir)`` (and ``evaluate.py --ckpt workdir``) rebuild the model
from ``minet_config.json`` and the best (else latest) ``params/``, without training
code: the folder names are this module's, recorded in ``minet_config.json`` for
`minet_jax.core.checkpoint` to follow; the steps' items (``params/``, ``meta/``) are in
its format.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from minet_jax.core import checkpoint, files
from minet_jax.core.checkpoint import META_ITEM, PARAMS_ITEM
from minet_jax.core.config import ModelConfig
from minet_jax.core.params import non_finite, weights_checksum
from minet_jax.train.state import TrainState, state_from_pure, state_to_pure

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
# The weight folders in the order `minet_jax.load` is to try them, recorded in the
# workdir's minet_config.json: the best validation PSNR, else the newest resumable.
WEIGHTS_IN = (BEST_DIR, LATEST_DIR)
DAMAGED_DIR = "damaged_checkpoints"
DIVERGED_DIR = "diverged_checkpoints"
TRAIN_CONFIG_FILE = "config.json"
_LATEST_ITEMS = ("state", PARAMS_ITEM, "data", META_ITEM)
_BEST_ITEMS = (PARAMS_ITEM, META_ITEM)


def write_model_config(workdir: pathlib.Path, model: ModelConfig) -> None:
  """Writes ``minet_config.json``: the model config in the format `minet_jax.load_config`
  reads, and `WEIGHTS_IN`, where `minet_jax.load` finds the weights."""
  checkpoint.write_config(workdir, model, weights_in=WEIGHTS_IN)


def weight_params(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """The ``params/`` folders of the workdir's steps: the best, then the resumable ones,
  newest first in each (read without ``minet_config.json``, which may be lost)."""
  return [params for sub in WEIGHTS_IN
          for params in checkpoint.step_params(pathlib.Path(workdir) / sub)]


def resumable_steps(workdir: str | pathlib.Path) -> list[int]:
  """The steps of the workdir's finished resumable checkpoints, newest first."""
  return [int(params.parent.name)
          for params in checkpoint.step_params(pathlib.Path(workdir) / LATEST_DIR)]


VALIDATION_PENDING = "validation_pending"  # A meta key: the step's validation failed.


def _params_dir(workdir: str | pathlib.Path, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / LATEST_DIR / str(step) / PARAMS_ITEM


def validation_pending(workdir: str | pathlib.Path, step: int) -> bool:
  """Whether the resumable checkpoint of ``step`` was saved when its validation failed
  (``train_and_evaluate`` runs that validation when it resumes there); False for a
  record that cannot be read (damage, which the resume reports)."""
  return bool(checkpoint.step_record(_params_dir(workdir, step)).get(VALIDATION_PENDING))


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


def _record(state: TrainState, weights: dict) -> dict:
  """What a step's meta records of its weights: their architecture (so a workdir
  whose config files were lost or edited still says what its checkpoints are) and
  their checksum."""
  return {"model": state.model_config.architecture(),
          "weights_sha256": weights_checksum(weights)}


# Failures of a read that say nothing about the checkpoint's files: the system's limits,
# permissions, memory, or a file system that is away. Errno values, and the status names
# tensorstore puts in its messages.
_NOT_DAMAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
                                errno.ENOMEM, errno.EIO, errno.ESTALE, errno.ENOSPC,
                                errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR})
_NOT_DAMAGE_STATUSES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                        "DEADLINE_EXCEEDED", "Out of memory", "out of memory")


def not_damage(error: BaseException) -> bool:
  """Whether a failed checkpoint read was the environment's fault, not its files': a
  `MemoryError`, an `OSError` of `_NOT_DAMAGE_ERRNOS`, or a (tensorstore, XLA) error
  naming one of `_NOT_DAMAGE_STATUSES`, anywhere in its chain of causes."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, MemoryError):
      return True
    if isinstance(error, OSError) and error.errno in _NOT_DAMAGE_ERRNOS:
      return True
    if any(status in str(error) for status in _NOT_DAMAGE_STATUSES):
      return True
    error = error.__cause__ or error.__context__
  return False


def _recover_replaced_best(folder: pathlib.Path) -> None:
  """Finishes a replacement of the best checkpoint that a dead process left half done
  (`Checkpoints.save_best` sets the old best aside as ``.replaced-<step>`` until its
  successor is on disk): the old one goes back when no successor was finalised, and
  is removed when one was. Left hidden, it would let any later score count as best."""
  if not folder.is_dir():
    return
  for replaced in sorted(folder.glob(".replaced-*")):
    step = re.fullmatch(r"\.replaced-(\d+)(\.\d+)?", replaced.name)
    if step is None or not replaced.is_dir():
      continue
    target = folder / step[1]
    if target.is_dir():  # Orbax names a step's folder only once it is finalised.
      shutil.rmtree(replaced)
    else:
      replaced.rename(target)


class CheckpointUnreadableError(checkpoint.CheckpointError):
  """A checkpoint could not be read for a reason outside its files (`not_damage`)."""


class NotFiniteError(ValueError):
  """Weights, optimizer moments or validation scores hold NaN or Inf: refused, not saved."""


def non_finite_state(state: TrainState) -> str | None:
  """Names the first weight or optimizer moment holding NaN or Inf (None when finite)."""
  return non_finite(state_to_pure(state)["state"])


# The validation scores computed from the model's output (the hazy input's are fixed).
_MODEL_SCORES = ("psnr", "ssim")


def _best_metric(metrics: dict) -> float:
  """Orbax's ranking of best checkpoints; a non-finite PSNR (kept by older versions)
  ranks below every real one, so it is the first removed."""
  psnr = float(metrics["psnr"])
  return psnr if math.isfinite(psnr) else -math.inf


@dataclasses.dataclass
class Damaged:
  """A checkpoint that did not restore: why, and where it was moved."""
  step: int
  reason: str
  moved_to: pathlib.Path | None


@dataclasses.dataclass
class Resumed:
  """What `Checkpoints.restore_newest_intact` found (``step`` None: nothing intact)."""
  step: int | None
  state: TrainState | None
  data: Any
  meta: dict
  damaged: list[Damaged]


class StateLayoutError(ValueError):
  """A resumable checkpoint holds a training state of another layout than the config
  builds (another optimizer): not damage, so nothing is moved aside."""


def _leaf_name(path: tuple) -> tuple[str, ...]:
  """A leaf's path without the positions of optax's chained states ('0', '1', ...)."""
  keys = (str(getattr(k, "key", k)) for k in path)
  return tuple(k for k in keys if not k.isdigit())


def _in_saved_layout(pure: Any, saved: Any, step: int) -> Any:
  """The restore target `pure` in the tree layout the checkpoint was saved with.

  Optimizer settings that add or drop a state without arrays (gradient clipping wraps
  Adam in ``optax.chain`` next to clipping's empty state) change the tree's layout but
  not its arrays: a checkpoint saved before such a change holds the same arrays in the
  same order, under paths that differ only in the chain's positions. Those restore
  into the new layout (the Adam moments carry over); anything else is a
  `StateLayoutError`.
  """
  if jax.tree.structure(saved) == jax.tree.structure(pure):
    return pure
  want = jax.tree_util.tree_flatten_with_path(pure)[0]
  have, saved_def = jax.tree_util.tree_flatten_with_path(saved)
  for (want_path, w), (have_path, h) in zip(want, have):
    if (_leaf_name(want_path) != _leaf_name(have_path) or tuple(w.shape) != tuple(h.shape)
        or np.dtype(w.dtype) != np.dtype(h.dtype)):
      raise StateLayoutError(
          f"checkpoint {step} holds another training state than this config builds (it "
          f"has {jax.tree_util.keystr(have_path)} {tuple(h.shape)} where the config "
          f"expects {jax.tree_util.keystr(want_path)} {tuple(w.shape)}): resume with the "
          "optimizer settings it was saved with, or train in another workdir")
  if len(want) != len(have):
    raise StateLayoutError(
        f"checkpoint {step} holds {len(have)} arrays of training state where this config "
        f"builds {len(want)}: resume with the optimizer settings it was saved with, or "
        "train in another workdir")
  return saved_def.unflatten([leaf for _, leaf in want])


class Checkpoints:
  """The periodic and best-PSNR checkpoint managers of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, async_save: bool = True):
    workdir = pathlib.Path(workdir).absolute()
    self.workdir = workdir
    checkpoint.quiet_abandoned_reads()
    if jax.process_index() == 0:
      _recover_replaced_best(workdir / BEST_DIR)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("minet_jax: best checkpoint recovered")
    self.latest = ocp.CheckpointManager(
        workdir / LATEST_DIR, item_names=_LATEST_ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                             enable_async_checkpointing=async_save))
    self.best = ocp.CheckpointManager(
        workdir / BEST_DIR, item_names=_BEST_ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             best_fn=_best_metric, best_mode="max",
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def validation_done(self, step: int) -> None:
    """Drops ``validation_pending`` from the meta of the checkpoint of ``step`` once
    that validation has run (on process 0; the file is replaced whole)."""
    if jax.process_index() != 0 or not validation_pending(self.workdir, step):
      return
    params_dir = _params_dir(self.workdir, step)
    meta = checkpoint.step_record(params_dir)
    del meta[VALIDATION_PENDING]
    files.write_text(checkpoint.step_record_file(params_dir), json.dumps(meta))

  def save(self, state: TrainState, data_state: Any, meta: dict) -> bool:
    """Saves a resumable checkpoint at ``state.step`` unless one exists; True if saved.

    Raises `NotFiniteError` (saving nothing) when a weight or optimizer moment is
    NaN or infinite: a resume from such a state could only fail again.
    """
    step = int(state.step)
    if step in self.latest.all_steps():
      return False
    problem = non_finite_state(state)
    if problem:
      raise NotFiniteError(f"the training state of step {step} is not finite: {problem}")
    weights = _host_weights(state)
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_pure(state)),
        params=ocp.args.StandardSave(weights),
        data=ocp.args.JsonSave(_json_ready(data_state)),
        meta=ocp.args.JsonSave({"step": step, **meta, **_record(state, weights)})))
    return True

  def _refuse_if_not_damage(self, step: int, error: BaseException, *,
                            manager: ocp.CheckpointManager | None = None) -> None:
    """Raises `CheckpointUnreadableError` when reading ``step`` of ``manager`` (default:
    the resumable checkpoints) failed for a reason outside its files (`not_damage`):
    the checkpoint stays where it is."""
    if not not_damage(error):
      return
    manager = self.latest if manager is None else manager
    what = "the best checkpoint" if manager is self.best else "checkpoint"
    folder = pathlib.Path(manager.directory) / str(step)
    raise CheckpointUnreadableError(
        f"{what} {step} ({folder}) could not be read ({checkpoint.one_line_error(error)}); "
        "that is no damage to its files, so nothing was moved: mend it and rerun to "
        "resume (a fault that stays: move that folder aside by hand)") from error

  def best_psnr(self) -> float | None:
    """The validation PSNR of the best checkpoint so far (None before the first).

    A best checkpoint that cannot be read is moved to ``damaged_checkpoints/best-<step>``
    (said on stderr) and counts as none: the next validation is kept in its place.
    """
    self.best.wait_until_finished()  # A save in flight is not damage.
    step = self.best.latest_step()
    if step is None:
      return None
    try:
      meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return float(meta.meta["psnr"])
    except Exception as e:  # orbax raises many types for damaged files.
      self._refuse_if_not_damage(step, e, manager=self.best)
      moved = self._move_aside(step, manager=self.best, name=f"best-{step}",
                               all_processes=True)
      if moved is not None:
        print(f"the best checkpoint {step} cannot be read ({checkpoint.one_line_error(e)}); "
              f"moved to {moved}", file=sys.stderr)
      return None

  def save_best(self, state: TrainState, scores: dict[str, float]) -> bool:
    """Keeps this step's weights if its validation PSNR beats the best so far.

    Raises `NotFiniteError` (keeping the best checkpoint there is) when a validation
    score or a weight is NaN or infinite.
    """
    step = int(state.step)
    scores = {k: float(v) for k, v in scores.items()}
    bad = {k: scores[k] for k in _MODEL_SCORES if not math.isfinite(scores[k])}
    if bad:
      listed = ", ".join(f"{k} {v}" for k, v in bad.items())
      raise NotFiniteError(f"the validation scores of step {step} are not finite ({listed})")
    weights = _host_weights(state)
    problem = non_finite(weights)
    if problem:
      raise NotFiniteError(f"the weights of step {step} are not finite: {problem}")
    best = self.best_psnr()
    finite_best = best is not None and math.isfinite(best)  # Older versions kept NaN.
    if finite_best and scores["psnr"] <= best:
      return False
    # A run resumed from a checkpoint older than the best can score better at the best's
    # own step, or below it: that best is replaced (orbax keeps the higher score of two
    # steps, but a step it holds it would not save again, and a lower one only forced).
    replaced = None
    if step in self.best.all_steps():
      replaced = self._move_aside(step, manager=self.best, folder=BEST_DIR,
                                  name=f".replaced-{step}", all_processes=True)
    try:
      saved = self.best.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(weights),
          meta=ocp.args.JsonSave({"step": step, **scores, **_record(state, weights)})),
          metrics=scores, force=True)
      if replaced is not None:
        self.best.wait_until_finished()
    except BaseException:
      if replaced is not None:  # The old best goes back; a partial new one goes.
        self._restore_replaced(step, replaced)
      raise
    if replaced is not None:  # Removed once its successor is on disk, never before.
      shutil.rmtree(replaced)
    return bool(saved)

  def _restore_replaced(self, step: int, replaced: pathlib.Path) -> None:
    """Puts a best checkpoint set aside for its replacement back at ``best/<step>``."""
    folder = self.workdir / BEST_DIR / str(step)
    if os.path.lexists(folder):
      shutil.rmtree(folder, ignore_errors=True)
    replaced.rename(folder)
    self.best.reload()

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
    # The saved tree's layout, from its metadata (a handler: no async machinery). Where
    # that cannot be read, the restore itself tells a whole checkpoint from a damaged one.
    folder = self.workdir / LATEST_DIR / str(step) / "state"
    try:
      saved = ocp.StandardCheckpointHandler().metadata(folder).tree
    except Exception:  # orbax/tensorstore raise many types for missing or damaged files.
      saved = None
    layout = pure if saved is None else _in_saved_layout(pure, saved, step)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(layout), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    values = jax.tree.unflatten(jax.tree.structure(pure), jax.tree.leaves(restored.state))
    state = state_from_pure(like, values)
    return state, _from_json(restored.data), dict(restored.meta)

  def restore_newest_intact(self, like: TrainState, sharding: Any = None) -> Resumed:
    """Restores the newest checkpoint that reads back completely.

    Each checkpoint is verified by restoring all of it: state, data iterator,
    meta and the weights in ``params/`` (against the checksum in its meta). A
    newer one that fails is moved to ``<workdir>/damaged_checkpoints/`` (never
    deleted; one holding NaN or Inf to ``diverged_checkpoints/``) and reported in
    ``damaged``; the next older one is tried.
    """
    damaged: list[Damaged] = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state, data, meta = self.restore(like, sharding, step)
      except StateLayoutError:
        raise  # Not damage: the config builds another optimizer state. Nothing is moved.
      except Exception as e:  # orbax/tensorstore raise many types for damaged files.
        self._refuse_if_not_damage(step, e)
        damaged.append(Damaged(step, checkpoint.one_line_error(e),
                               self._move_aside(step, all_processes=True)))
        continue
      problem = non_finite_state(state)  # Saved by a version that did not refuse them.
      if problem:
        damaged.append(Damaged(step, f"not finite: {problem}",
                               self._move_aside(step, DIVERGED_DIR, all_processes=True)))
        continue
      try:
        self._verify_params(step, state, meta)
      except Exception as e:
        self._refuse_if_not_damage(step, e)
        damaged.append(Damaged(step, checkpoint.one_line_error(e),
                               self._move_aside(step, all_processes=True)))
        continue
      return Resumed(step, state, data, meta, damaged)
    return Resumed(None, None, None, {}, damaged)

  def _verify_params(self, step: int, state: TrainState, meta: dict) -> None:
    folder = _params_dir(self.workdir, step)
    checkpoint.read_weights(folder, state.model_config, meta.get("weights_sha256"))

  def set_aside_from(self, step: int) -> list[int]:
    """Moves the resumable checkpoints of `step` and later to ``diverged_checkpoints/``.

    Called when the state of `step` led to NaN or infinite values: resuming from it
    (or from a later one) would only reach them again.
    """
    moved = [s for s in sorted(self.latest.all_steps()) if s >= step]
    for s in moved:
      self._move_aside(s, DIVERGED_DIR, all_processes=True)
    return moved

  def _move_aside(self, step: int, folder: str = DAMAGED_DIR, *,
                  manager: ocp.CheckpointManager | None = None, name: str | None = None,
                  all_processes: bool = False) -> pathlib.Path | None:
    """Moves ``step`` of ``manager`` (default: the resumable checkpoints) to
    ``<workdir>/<folder>/<name>`` (default name: the step; ``.1``, ``.2``, ... added to
    a name taken); the path on process 0, None on the others. ``all_processes``: every
    process calls this, and reloads its manager once process 0 has moved the step."""
    manager = self.latest if manager is None else manager
    target = None
    if jax.process_index() == 0:
      source = pathlib.Path(manager.directory) / str(step)
      base = target = self.workdir / folder / (name or str(step))
      n = 0
      while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    if all_processes and jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"minet_jax: checkpoint {step} moved aside")
    if all_processes or jax.process_index() == 0:
      manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until every pending (asynchronous) save is on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
