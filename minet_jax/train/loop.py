"""`train_and_evaluate(config, workdir)`: the training loop.

Resumes from the workdir's latest checkpoint when there is one (weights, Adam
state, step, PRNG key and the input pipeline's position), else starts from
``config.init_from`` or a random init. Validates every ``eval_every`` steps
(PSNR/SSIM under the SOTS protocol, an image grid, the best checkpoint),
checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM.
A non-finite loss or gradient, non-finite validation scores or a non-finite
state stop the run with `NonFiniteLossError`. Nothing non-finite is saved, and
the checkpoints of the state that led there (and any later ones) are moved to
``diverged_checkpoints/``: the checkpoints left are all ones a rerun can continue
from, and the error names the newest of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from minet_jax.core import checkpoint, files
from minet_jax import hub
from minet_jax.core.config import ModelConfig
from minet_jax.core.params import Params
from minet_jax.train import checkpointing, config_file, inputs, sharding
from minet_jax.train.checks import (ConfigError, architecture_differences, check_crop,
                                    check_workdir_config, prepare_workdir, trained_blocks,
                                    validate_config)
from minet_jax.train.evaluator import Evaluator
from minet_jax.train.lock import WorkdirLock
from minet_jax.train.logging import MetricWriter
from minet_jax.train.signals import StopRequest
from minet_jax.train.state import (TrainState, abstract_train_state, create_train_state,
                                   learning_rate_schedule, replace_blocks,
                                   shrink_blocks)
from minet_jax.train.step import make_train_step

__all__ = ["ConfigError", "DiskFullError", "NonFiniteLossError", "train_and_evaluate",
           "validate_config"]


class DiskFullError(OSError):
  """A write of the run failed for want of space; a rerun after freeing some resumes."""


def _disk_full(error: BaseException) -> tuple[bool, str | None]:
  """(whether `error` or one of its causes is "no space left on device", the path
  that could not be written when known). Orbax reports tensorstore's ENOSPC as a
  ValueError naming the file and the OS error code."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True, e.filename
    text = str(e)
    if "No space left on device" in text or f"os_error_code='{errno.ENOSPC}'" in text:
      found = re.search(r'local file "([^"]+)"', text)
      return True, found.group(1) if found else None
    todo += [e.__cause__, e.__context__]
  return False, None


def _disk_full_error(workdir: pathlib.Path, path: str | None) -> DiskFullError:
  steps = checkpointing.resumable_steps(workdir)
  resume = (f"from step {max(steps)}, its newest checkpoint" if steps else
            "from the start (no checkpoint was saved)")
  return DiskFullError(errno.ENOSPC, f"no space left on the disk of {path or workdir}; "
                       f"training stopped. Free space there and rerun with the same "
                       f"--workdir: training resumes {resume}")


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradient, the validation scores or the weights became NaN or
  infinite; training stopped without saving them."""


def _record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict
                   ) -> dict[str, list[Any]]:
  """Writes the training config of this (accepted) start as ``config.json``; returns the
  fields that differ from the one it replaces, ``{"optimizer.learning_rate": [old,
  new]}`` (fields only one of them has: None on the other side)."""
  path = workdir / checkpointing.TRAIN_CONFIG_FILE
  text = config.to_json_best_effort(indent=2) + "\n"
  try:
    before = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".")
  except (OSError, ValueError, RecursionError, AttributeError):  # None, or not a record.
    before = None
  files.write_text(path, text)
  if before is None:
    return {}
  after = traverse_util.flatten_dict(json.loads(text), sep=".")
  return {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
          if before.get(k) != after.get(k)}


def _report_damaged(resumed: checkpointing.Resumed, writer: MetricWriter) -> None:
  """Says which checkpoint a resume uses, when newer ones were damaged, and where they went."""
  for d in resumed.damaged:
    writer.write_event(d.step, "damaged_checkpoint", reason=d.reason,
                       moved_to=str(d.moved_to) if d.moved_to else None)
    tqdm.write(f"checkpoint {d.step} could not be restored ({d.reason}); moved it to "
               f"{d.moved_to}")
  if resumed.damaged:
    tqdm.write(f"resuming from step {resumed.step}, the newest intact checkpoint" if
               resumed.step is not None else "no intact checkpoint left: starting afresh")


def _check_start_architecture(what: str, old: ModelConfig, new: ModelConfig) -> None:
  """Refuses weights of architecture `old` (`what`) as the start of a run of `new`, the
  INIT_FROM_FREE_FIELDS aside (`ModelConfig.same_weights`)."""
  if not old.same_weights(new):
    differences = architecture_differences(old.fixed_architecture(), new.fixed_architecture())
    raise ConfigError(f"{what} has a different architecture than config.model "
                      f"({differences}); set config.model to the checkpoint's architecture")


def _is_model(path: pathlib.Path) -> bool:
  """Whether ``path`` holds weights to start from rather than a training run: a .pth
  file, a `minet_jax.save` folder or one checkpoint step's folder."""
  return (path.is_file() or (path / checkpoint.PARAMS_ITEM).is_dir()
          or checkpoint.is_saved_model(path))


def _last_step(path: pathlib.Path, default: int) -> int:
  """The last step of the run in workdir ``path``: the one its recorded training config
  names (a run resumed with another num_train_steps ends there), else ``default``."""
  try:
    return int(json.loads((path / checkpointing.TRAIN_CONFIG_FILE).read_text())
               ["num_train_steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return default  # No record yet (a run stopped before its first write).


def _prior_run(config: ml_collections.ConfigDict, cfg: ModelConfig,
               chain: tuple[pathlib.Path, ...]
               ) -> tuple[ml_collections.ConfigDict, pathlib.Path] | None:
  """(``config.init_from_config``'s config, ``config.init_from`` as its workdir) when
  that run has still to start or to reach its last step (`_last_step`), else None (a
  finished run, or weights to start from: `_is_model`).
  Everything about it that can be checked before it trains is: its config, that its
  weights can start ``config.model``, and that it is not a run of the chain (the
  workdirs of the runs waiting on it, this one's first)."""
  if not config.init_from_config:
    return None
  where = pathlib.Path(config.init_from).expanduser().absolute()
  if any(where.resolve() == w.resolve() for w in chain):
    raise ConfigError(f"config.init_from_config trains config.init_from, {where}, which is "
                      "the --workdir of this run or of a run waiting on it: give each run "
                      "its own folder")
  try:
    prior = config_file.load_module(config.init_from_config).get_config()
  except Exception as e:  # A config file can raise anything; a one-line error says which.
    raise ConfigError(f"config.init_from_config {config.init_from_config}: "
                      f"{type(e).__name__}: {e}") from e
  try:
    prior_cfg = validate_config(prior)
  except ConfigError as e:
    raise ConfigError(f"config.init_from_config {config.init_from_config}: {e}") from e
  _check_start_architecture(
      f"the model of config.init_from_config {config.init_from_config}", prior_cfg, cfg)
  if _is_model(where):
    return None
  prior.num_train_steps = _last_step(where, int(prior.num_train_steps))
  done = checkpointing.resumable_steps(where)
  if (done and max(done) >= prior.num_train_steps
      and not checkpointing.validation_pending(where, max(done))):
    return None  # Finished, its last validation included.
  # One job: the first run joins (or not) the same processes as this one.
  prior.distributed = config.distributed
  return prior, where


def _resolve_named(name: str, spec: str) -> Params:
  """`hub.resolve` of the model that ``config.<name>`` names; ConfigError naming the field."""
  try:
    return hub.resolve(spec)
  except (OSError, ValueError) as e:  # CheckpointError is an OSError
    raise ConfigError(f"config.{name}: {e}") from e


def _init_from(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Params | None:
  """``config.init_from``'s weights (None when unset), with the IM-blocks that
  ``config.init_blocks_from`` names taken from those models and each block's f scaled
  by ``config.init_block_scale`` when given; refuses an architecture other than `cfg`'s
  (``config.model``)."""
  if not config.init_from:
    return None
  params = hub.resolve(config.init_from)
  _check_start_architecture(f"config.init_from {config.init_from}", params.config, cfg)
  # The run's own config from here on: the source's solve settings (checked against
  # its own roles) play no part in this run, so they must not veto the new roles.
  try:
    params = Params(weights=params.weights, config=cfg)
  except ValueError as e:
    raise ConfigError(f"config.init_from {config.init_from}: {e}") from e
  sources = {i: _resolve_named(f"init_blocks_from[{i}]", spec)
             for i, spec in enumerate(config.init_blocks_from) if spec}
  if sources:
    try:
      params = replace_blocks(params, sources)
    except ValueError as e:
      raise ConfigError(f"config.init_blocks_from: {e}") from e
  if tuple(config.init_block_scale):
    params = shrink_blocks(params, tuple(config.init_block_scale))
  return params


def _initial_state(config: ml_collections.ConfigDict, cfg: ModelConfig,
                   params: Params | None = None) -> TrainState:
  """The state of a fresh start of model `cfg` (``config.model``): `params` (else
  ``config.init_from``'s weights), else a random init."""
  if params is None:
    params = _init_from(config, cfg)
  try:
    return create_train_state(config, params, cfg)
  except ValueError as e:  # e.g. init_from weights of a different architecture
    raise ConfigError(str(e)) from e


def _teacher(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Params | None:
  """The model whose outputs are the training targets (``config.teacher``), or None;
  `ConfigError` naming the field when it cannot be loaded, or when its IM-blocks'
  states, which the matching term compares with the student's, have other shapes.

  It runs as its checkpoint says (the released model: T = 8 unrolled), whatever
  ``config.model`` asks of the student.
  """
  if not config.teacher:
    return None
  teacher = _resolve_named("teacher", config.init_from if config.teacher == "init_from"
                           else config.teacher)
  _check_teacher(config, cfg, teacher)
  return teacher


def _check_teacher(config: ml_collections.ConfigDict, cfg: ModelConfig, teacher: Params
                   ) -> None:
  """`ConfigError` when the step would compare the teacher's IM-block states with the
  student's (the matching term, the student's block inputs, or the penalty at the
  teacher's answers without an output term: `make_train_step`) and their shapes differ."""
  states_used = (float(config.teacher_match_weight) > 0 or config.teacher_inputs != "teacher"
                 or (cfg.contractive_weight > 0 and cfg.contractive_point == "solution"
                     and not float(config.output_weight)))
  theirs, ours = teacher.config, cfg
  if states_used and (theirs.features, theirs.num_blocks) != (ours.features, ours.num_blocks):
    raise ConfigError(
        f"config.teacher {config.teacher}: its IM-blocks ({theirs.num_blocks} of "
        f"{theirs.features} features) do not match config.model's ({ours.num_blocks} of "
        f"{ours.features}), whose block states the matching term compares with its own; "
        "a teacher of another architecture can only give the output term "
        "(teacher_match_weight 0, teacher_inputs 'teacher', output_weight > 0)")


def step_options(config: ml_collections.ConfigDict, cfg: ModelConfig,
                 teacher: Params | None = None) -> dict[str, Any]:
  """What ``config`` asks of a training step beyond its loss, schedule and compiler
  options: the teacher (``teacher``, else loaded by `_teacher`), the weights of the
  matching and output terms, the matching steps, whose block inputs are matched and
  the trained blocks, as `make_train_step` (and `train_step`) take them."""
  if teacher is None:
    teacher = _teacher(config, cfg)
  return dict(teacher=teacher, match_weight=float(config.teacher_match_weight),
              output_weight=float(config.output_weight),
              match_steps=int(config.teacher_match_steps),
              teacher_inputs=str(config.teacher_inputs),
              train_blocks=trained_blocks(config, cfg.num_blocks))


@dataclasses.dataclass
class _Start:
  """What an accepted start has read: the data sources, the weights to start from and
  the teacher."""
  train_source: Any
  eval_source: Any
  init_params: Params | None
  teacher: Params | None


def _data_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """`inputs.sources` (built if need be), with its errors as the run reports them, and
  the crop checked against the training images."""
  try:
    train_source, eval_source = inputs.sources(config)
  except ValueError as e:
    from minet_jax.data import DatasetLayoutError
    if isinstance(e, DatasetLayoutError):
      raise
    raise ConfigError(f"config.data: {e}") from e
  check_crop(config, train_source)
  return train_source, eval_source


def _accept_start(config: ml_collections.ConfigDict, cfg: ModelConfig,
                  workdir: pathlib.Path) -> _Start:
  """Every check of a start that needs the workdir or the data; writes nothing there."""
  check_workdir_config(workdir, cfg)
  train_source, eval_source = _data_sources(config)
  # The weights to start from are read now, not after the first writes, unless a
  # resume will not need them.
  resuming = bool(checkpointing.resumable_steps(workdir))
  init_params = None if resuming else _init_from(config, cfg)
  teacher = _teacher(config, cfg)
  prepare_workdir(workdir)
  return _Start(train_source, eval_source, init_params, teacher)


def _mean(history: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       ) -> dict[str, Any]:
  """Trains MI-Net as `config` says, in `workdir` (resuming it if it has checkpoints).

  With ``config.init_from_config``, a fresh start first trains (or finishes) that run
  in ``config.init_from``, holding this workdir's lock meanwhile.

  Returns a summary: ``step`` reached, ``stopped_by`` (None, "SIGTERM" or "SIGINT"), the
  last validation scores (``psnr``, ``ssim``, ``hazy_psnr``, ...), ``best_psnr``,
  ``steps_per_second`` and ``seconds``; a stop in a run this one waits on returns that
  run's summary with ``stopped_in``, its workdir.
  """
  return _train_and_evaluate(config, workdir, chain=())


def _on_terminal() -> bool:
  """Whether the progress bar's stream (stderr) is a terminal."""
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # Replaced or closed by the caller.
    return False


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                        chain: tuple[pathlib.Path, ...]) -> dict[str, Any]:
  """`train_and_evaluate`; ``chain``: the workdirs of the runs waiting on this one."""
  t_start = time.time()
  cfg = validate_config(config)  # config.model, parsed once for the whole run.
  sharding.maybe_initialize_distributed(bool(config.distributed))
  workdir = pathlib.Path(workdir).expanduser().absolute()
  # One run per workdir, locked before anything is read or written there.
  lock = WorkdirLock.acquire(workdir) if jax.process_index() == 0 else None
  try:
    # A resume ignores init_from, and so what trains it.
    prior = (None if checkpointing.resumable_steps(workdir)
             else _prior_run(config, cfg, (workdir, *chain)))
    if prior is not None:
      summary = _train_prior(config, cfg, workdir, prior, chain)
      if summary["stopped_by"] is not None:
        if lock is not None:
          lock.release(refused=True)
          lock = None
        return {**summary, "stopped_in": summary.get("stopped_in", str(prior[1]))}
    start = _accept_start(config, cfg, workdir)
  except BaseException:
    if lock is not None:
      lock.release(refused=True)
    raise
  try:
    return _train(config, cfg, workdir, start, t_start)
  except Exception as e:
    full, path = _disk_full(e)
    if full:
      raise _disk_full_error(workdir, path) from e
    raise
  finally:
    if lock is not None:
      lock.release()


def _train_prior(config: ml_collections.ConfigDict, cfg: ModelConfig, workdir: pathlib.Path,
                 prior: tuple[ml_collections.ConfigDict, pathlib.Path],
                 chain: tuple[pathlib.Path, ...]) -> dict[str, Any]:
  """Trains `_prior_run`'s run after the checks of this run's start that do not need its
  weights; its errors say which run they come from."""
  from minet_jax.data import DatasetLayoutError  # Deferred, as in _accept_start.
  prior_config, prior_dir = prior
  check_workdir_config(workdir, cfg)
  _data_sources(config)  # Built now, so a wrong data folder is found before that run.
  # The other weights this run reads, unless that run makes them.
  for name, spec in [("teacher", config.teacher if config.teacher != "init_from" else ""),
                     *((f"init_blocks_from[{i}]", s)
                       for i, s in enumerate(config.init_blocks_from))]:
    if spec and pathlib.Path(spec).expanduser().absolute() != prior_dir:
      weights = _resolve_named(name, spec)
      if name == "teacher":  # Before that run, which may take hours, not after it.
        _check_teacher(config, cfg, weights)
  if jax.process_index() == 0:
    tqdm.write(f"config.init_from {prior_dir} is not trained to its last step: training it "
               f"first with {config.init_from_config} (this run's --config overrides do "
               "not apply to it)")
  try:
    return _train_and_evaluate(prior_config, prior_dir, chain=(workdir, *chain))
  except (ConfigError, NonFiniteLossError, DatasetLayoutError,
          checkpoint.CheckpointError) as e:  # Each takes one message.
    raise type(e)(f"training config.init_from {prior_dir} with {config.init_from_config} "
                  f"first: {e}") from e


def _resume_or_start(config: ml_collections.ConfigDict, cfg: ModelConfig, start: _Start,
                     ckpts: checkpointing.Checkpoints, train_iter: Any, writer: MetricWriter,
                     mesh: Any) -> tuple[TrainState, int | None, dict[str, Any]]:
  """(state, the step resumed from or None, its checkpoint's meta): the newest intact
  checkpoint with the data iterator moved to its position, else a fresh start."""
  try:
    resumed = ckpts.restore_newest_intact(abstract_train_state(config, cfg),
                                          sharding.replicated(mesh))
  except checkpointing.StateLayoutError as e:
    raise ConfigError(str(e)) from e
  _report_damaged(resumed, writer)
  if resumed.step is None:
    state = sharding.replicate(_initial_state(config, cfg, start.init_params), mesh)
    # An earlier attempt's best (its checkpoints set aside as diverged or damaged, or it
    # stopped before its first one) stays, and this run's validations must beat it.
    earlier_best = ckpts.best_psnr()
    writer.write_event(0, "start", init_from=config.init_from or None,
                       init_from_config=config.init_from_config or None,
                       init_blocks_from=list(config.init_blocks_from) or None,
                       devices=mesh.devices.size, processes=jax.process_count(),
                       earlier_best_psnr=earlier_best)
    if earlier_best is not None and jax.process_index() == 0:
      tqdm.write(f"starting afresh; the best checkpoint of an earlier attempt in this "
                 f"workdir ({earlier_best:.2f} dB) stays, and is replaced only by a better "
                 "validation")
    return state, None, {}
  try:
    inputs.restore_iterator(train_iter, resumed.data, int(config.data.worker_count))
  except (KeyError, ValueError, TypeError, IndexError) as e:  # Also grain's, on another layout.
    from minet_jax.data.pipeline import saved_worker_count
    count = saved_worker_count(resumed.data) if isinstance(resumed.data, dict) else None
    saved = "data.worker_count > 0" if count is None else f"data.worker_count = {count}"
    raise ConfigError(
        f"the data position saved with step {resumed.step} ({saved}) does not fit this "
        f"input pipeline (data.worker_count = {config.data.worker_count}; "
        f"{checkpoint.one_line_error(e)}): resume with the data settings it was saved "
        "with") from e
  writer.write_event(resumed.step, "resume", from_step=resumed.step,
                     skipped_damaged=[d.step for d in resumed.damaged])
  return resumed.state, resumed.step, resumed.meta


def _train(config: ml_collections.ConfigDict, cfg: ModelConfig, workdir: pathlib.Path,
           start: _Start, t_start: float) -> dict[str, Any]:
  """`train_and_evaluate` once its start is accepted (and the workdir locked)."""
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  try:
    train_iter = inputs.train_iterator(config, start.train_source, mesh)
  except ValueError as e:  # e.g. "data.batch_size=3 must be divisible by ..."
    raise ConfigError(f"config.{e}" if str(e).startswith("data.") else f"config.data: {e}") from e
  # A refused start leaves no workers or open files behind; once started, the loop's
  # `finally` closes them.
  with contextlib.ExitStack() as on_refusal:
    if hasattr(train_iter, "close"):
      on_refusal.callback(train_iter.close)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    on_refusal.callback(writer.close)
    evaluator = Evaluator(config, start.eval_source, mesh)
    ckpts = checkpointing.Checkpoints(workdir, keep=int(config.keep_checkpoints),
                                      async_save=bool(config.async_checkpointing))
    on_refusal.callback(ckpts.close)
    state, resumed_from, resumed_meta = _resume_or_start(config, cfg, start, ckpts,
                                                         train_iter, writer, mesh)
    on_refusal.pop_all()
  if jax.process_index() == 0:
    checkpointing.write_model_config(workdir, state.model_config)
    changed = _record_config(workdir, config)
    if resumed_from is not None and changed:
      # The steps before the resume ran with the old values: said and kept in the log.
      writer.write_event(resumed_from, "config_changed", fields=changed)
      tqdm.write(f"resuming with {len(changed)} changed config field(s): "
                 + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))

  schedule = learning_rate_schedule(config.optimizer)
  train_step = make_train_step(config.loss, schedule, replicated, sharding.batch_sharded(mesh),
                               ynn_fusions=config.xla_cpu_ynn_fusions,
                               **step_options(config, cfg, start.teacher))

  step = int(state.step)
  total = int(config.num_train_steps)
  last_scores: dict[str, float] = {}
  history: list[dict[str, float]] = []
  stop = StopRequest()
  train_seconds, timed_steps = 0.0, 0

  def stop_diverged(bad_step: int, what: str, event: str, **fields: Any) -> NoReturn:
    """Sets aside the checkpoints from `bad_step` on and raises `NonFiniteLossError`."""
    ckpts.wait()
    set_aside = ckpts.set_aside_from(bad_step)
    last_good = ckpts.latest_step()
    writer.write_event(step, event, **fields, last_checkpoint=last_good,
                       set_aside=set_aside)
    if set_aside:
      what += (f"; the checkpoints of steps {set_aside}, which lead there, were moved to "
               f"{workdir / checkpointing.DIVERGED_DIR}")
    if last_good is None:
      resume = ("There is no good checkpoint to resume from: a rerun starts afresh (or "
                "from config.init_from).")
    else:
      resume = (f"The last good checkpoint is step {last_good} in "
                f"{workdir / checkpointing.LATEST_DIR}: a rerun resumes from it.")
    raise NonFiniteLossError(
        f"{what}; training stopped without saving it. {resume} Lower "
        "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm first.")

  def save(state: TrainState, *, validation_pending: bool = False) -> None:
    meta = {"time": time.time(), **{f"eval_{k}": v for k, v in last_scores.items()}}
    if validation_pending:  # A resume validates it first (`_train`).
      meta[checkpointing.VALIDATION_PENDING] = True
    try:
      ckpts.save(state, inputs.iterator_state(train_iter), meta)
    except checkpointing.NotFiniteError as e:
      stop_diverged(int(state.step), str(e), "non_finite_state")

  def saved_before_failing(state: TrainState, *, validation_pending: bool = False) -> bool:
    """Saves the state that a failure outside the step (validation, the data) would
    leave unsaved, so that a rerun loses no steps; True once it is on disk. Its own
    failure is not reported: the first one is what stops the run.

    Only steps trained since the last checkpoint are saved (a step-0 checkpoint would
    tie the workdir to a start that never trained), and only in a one-process job: the
    other processes of a job are not at this point, and a save waits for them all."""
    if jax.process_count() > 1 or int(state.step) <= (ckpts.latest_step() or 0):
      return False
    try:
      save(state, validation_pending=validation_pending)
      ckpts.wait()
    except Exception:
      return False
    return ckpts.latest_step() == int(state.step)

  def evaluate(state: TrainState) -> None:
    nonlocal last_scores
    scores, rows = evaluator(state)
    last_scores = scores
    writer.write_scalars(int(state.step), "eval", scores)
    writer.write_grid(int(state.step), rows)
    try:
      ckpts.save_best(state, scores)
    except checkpointing.NotFiniteError as e:
      stop_diverged(int(state.step), str(e), "non_finite_validation")
    if jax.process_index() == 0:
      tqdm.write(f"step {int(state.step)}: validation PSNR {scores['psnr']:.2f} dB "
                 f"(hazy input {scores['hazy_psnr']:.2f} dB), SSIM {scores['ssim']:.4f}")

  if resumed_from is not None and step >= total and jax.process_index() == 0:
    tqdm.write(f"{workdir} is already trained to step {step} (config.num_train_steps = "
               f"{total}): nothing to train; raise --config.num_train_steps to go on"
               + ("" if config.optimizer.schedule != "cosine" else
                  f" (steps past optimizer.decay_steps = {config.optimizer.decay_steps} run "
                  "at the cosine's final rate: raise it too for more than that)"))
  bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  if not _on_terminal() and not type(bar).__module__.startswith("tqdm.notebook"):
    # Into a file or pipe, each redraw is a new line: one every 30 s, not 10 a second.
    bar.mininterval = 30.0
  try:
    def stop_here(state: TrainState) -> None:
      save(state)
      writer.write_event(step, "stopped", signal=stop.name)
      if jax.process_index() == 0:
        tqdm.write(f"{stop.name}: saved step {step} in {workdir}; rerun to resume")

    with stop.installed():
      if resumed_meta.get(checkpointing.VALIDATION_PENDING):
        # Saved when its validation failed: validated now, the fault presumably mended
        # (or the run stops again, in one line, and the step stays saved and pending).
        if jax.process_index() == 0:
          tqdm.write(f"validating step {step}, saved when its validation failed")
        evaluate(state)
        ckpts.validation_done(step)
        stopped = stop.reached(step)  # Asked meanwhile: the step is saved already.
        if stopped:
          stop_here(state)
      else:
        stopped = False
      while step < total and not stopped:
        try:
          local = next(train_iter)
        except Exception as e:  # A bad image the start-up checks could not see.
          if stop:  # The signal reached the data's worker processes too.
            stop_here(state)
            break
          resume = (f"step {step} is saved: a rerun resumes from it"
                    if saved_before_failing(state) else
                    "a rerun resumes from the last checkpoint")
          raise ConfigError(
              f"the training data failed at step {step + 1}: {checkpoint.one_line_error(e)}; "
              "fix the data or config.data (crop_size 0 takes whole images, which must "
              f"then share one size per batch); {resume}") from e
        batch = sharding.global_batch(local, mesh)
        t0 = time.time()
        state, step_metrics = train_step(state, batch)
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        step += 1
        if step > (resumed_from or 0) + 1:  # The first step also compiles.
          train_seconds += time.time() - t0
          timed_steps += 1
        # A non-finite gradient has already spoilt this step's update, even if the
        # loss (computed before it) is finite. Both came from the state before this
        # step: a resume from that state would meet them again.
        if not (math.isfinite(step_metrics["loss"]) and math.isfinite(step_metrics["grad_norm"])):
          stop_diverged(step - 1, f"the training loss became {step_metrics['loss']} "
                        f"(gradient norm {step_metrics['grad_norm']}) at step {step}",
                        "non_finite_loss", loss=step_metrics["loss"],
                        grad_norm=step_metrics["grad_norm"])
        history.append(step_metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4g}", refresh=False,  # update() redraws
                        **({"psnr": f"{step_metrics['psnr']:.2f}"} if "psnr" in step_metrics
                           else {}))
        if step % int(config.log_every) == 0 or step == total:
          summary = _mean(history)
          if timed_steps:
            summary["steps_per_second"] = timed_steps / train_seconds
          writer.write_scalars(step, "train", summary)
          history = []
        if (int(config.eval_every) and step % int(config.eval_every) == 0) or step == total:
          try:
            evaluate(state)
          except NonFiniteLossError:
            raise  # Its checkpoints are set aside; this state is not to be kept.
          except Exception:
            # A validation that fails costs no training; a resume validates this step.
            saved_before_failing(state, validation_pending=True)
            raise
        if step % int(config.checkpoint_every) == 0 or step == total:
          save(state)
        if stop.reached(step):
          stop_here(state)
          break
  finally:
    bar.close()
    # While the last saves are written, SIGTERM or a first Ctrl-C only asks; a second
    # Ctrl-C is the user's way out (KeyboardInterrupt), leaving an unfinished save
    # that a resume never picks.
    with stop.installed():
      ckpts.wait()
    failing = sys.exc_info()[1] is not None
    try:
      best_psnr = ckpts.best_psnr()
    except checkpointing.CheckpointUnreadableError:
      if not failing:  # Else the error already on its way is the one to report.
        raise
      best_psnr = None
    finally:
      ckpts.close()
      writer.close()
      if hasattr(train_iter, "close"):
        train_iter.close()
  return {
      "step": step,
      # A signal met after the last step (while the last saves were written) stopped
      # nothing: the run is done, and the exit status says so.
      "stopped_by": stop.name if stop and step < total else None,
      **last_scores,
      "best_psnr": best_psnr,
      "steps_per_second": timed_steps / train_seconds if timed_steps else None,
      "seconds": time.time() - t_start,
  }
