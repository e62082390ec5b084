"""`train_and_evaluate(config, workdir)`: the training loop.

Resumes from the workdir's latest checkpoint when there is one (weights, Adam
state, step, PRNG key and the input pipeline's position), else starts from
``config.init_from`` or a random init. Validates every ``eval_every`` steps
(PSNR/SSIM under the SOTS protocol, an image grid, the best checkpoint),
checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM.
A non-finite loss stops the run with `NonFiniteLossError`; the checkpoints on
disk are then all from before it.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import signal
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from minet_jax import api, checkpoint, files, metrics
from minet_jax.config import model_config
from minet_jax.train import checkpointing, sharding
from minet_jax.train.logging import MetricWriter
from minet_jax.train.state import (TrainState, abstract_train_state, create_train_state,
                                   learning_rate_schedule)
from minet_jax.train.step import LOSSES, make_train_step


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; training stopped before saving it."""


class ConfigError(ValueError):
  """The config, or the workdir it is used with, cannot be trained; the message says why."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the field and a fix for values training cannot use."""
  try:
    model_config(config.model)  # Checks the architecture fields.
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from e
  if config.loss not in LOSSES:
    raise ConfigError(f"config.loss must be one of {LOSSES}, got {config.loss!r}")
  positive = ["num_train_steps", "log_every", "checkpoint_every", "keep_checkpoints"]
  for name in positive:
    if int(config[name]) < 1:
      raise ConfigError(f"config.{name} must be >= 1, got {config[name]}")
  for name in ("eval_every", "grid_images"):
    if int(config[name]) < 0:
      raise ConfigError(f"config.{name} must be >= 0, got {config[name]}")
  data = config.data
  if int(data.batch_size) < 1 or int(data.eval_batch_size) < 1:
    raise ConfigError("config.data.batch_size and config.data.eval_batch_size must be >= 1")
  if int(data.crop_size) < 0 or int(data.crop_size) % 2:
    raise ConfigError(f"config.data.crop_size must be 0 (full images) or an even number of "
                     f"pixels (the encoder halves them), got {data.crop_size}")
  if float(config.optimizer.learning_rate) <= 0:
    raise ConfigError(f"config.optimizer.learning_rate must be > 0, got "
                     f"{config.optimizer.learning_rate}")
  if not 0 <= int(config.seed) < 2**31:
    raise ConfigError(f"config.seed must be in [0, 2**31), got {config.seed}")


# ------------------------------------------------------------------ data


def _synthetic_config(data: ml_collections.ConfigDict):
  from minet_jax.data.synthetic import SyntheticHazeConfig
  fields = data.synthetic.to_dict()
  fields["image_size"] = tuple(fields["image_size"])
  return SyntheticHazeConfig(**fields)


def _sources(config: ml_collections.ConfigDict):
  """(train, validation) random-access sources; builds the TFDS datasets if needed.

  In a multi-process job process 0 builds (or opens) them first and the others wait:
  two builds of one dataset folder at once would collide.
  """
  sources = _load_sources(config) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("minet_jax: training data ready")
  return sources or _load_sources(config)


def _load_sources(config: ml_collections.ConfigDict):
  from minet_jax.data import builders

  data = config.data
  data_dir = data.data_dir or None
  manual_dir = data.manual_dir or None
  synthetic = _synthetic_config(data)
  train = builders.load_source(data.name, data.train_split, data_dir, manual_dir,
                               synthetic_config=synthetic)
  eval_name = data.eval_name or data.name
  # A RESIDE root holds ITS and SOTS alike, so the training folder is the default.
  eval_manual = data.eval_manual_dir or manual_dir
  validation = builders.load_source(eval_name, data.eval_split, data_dir, eval_manual,
                                    synthetic_config=synthetic)
  return train, validation


def _train_iterator(config: ml_collections.ConfigDict, source, mesh) -> Any:
  from minet_jax.data import pipeline

  data = config.data
  local_batch = sharding.per_host_batch_size(int(data.batch_size), mesh)
  dataset = pipeline.train_dataset(
      source, batch_size=local_batch, crop_size=int(data.crop_size) or None,
      flip=bool(data.random_flip), seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  return pipeline.make_iterator(dataset, worker_count=int(data.worker_count))


def _iterator_state(iterator) -> dict:
  from minet_jax.data import pipeline
  return json.loads(pipeline.iterator_state(iterator))


def _restore_iterator(iterator, state: dict) -> None:
  from minet_jax.data import pipeline
  pipeline.restore_iterator(iterator, state)


# ------------------------------------------------------------------ evaluation


def _predict_fn(mesh):
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
      raise ValueError(f"{e}. The validation images differ in size: set "
                       "config.data.eval_batch_size=1") from e

  def __call__(self, state: TrainState) -> tuple[dict[str, float], list]:
    """(scores, grid rows): mean ``psnr``, ``ssim`` and the hazy input's, per image."""
    devices = self.mesh.devices.size
    psnrs, ssims, hazy_psnrs, hazy_ssims, rows = [], [], [], [], []
    for batch in self._batches():
      hazy, n = sharding.pad_to_multiple(batch["hazy"], devices)
      x = jax.device_put(hazy, sharding.batch_sharded(self.mesh))
      out = np.asarray(jax.device_get(self.predict(state, x)))[:n]
      clear = batch["clear"]
      psnrs.append(np.asarray(metrics.psnr(out * 255.0, clear * 255.0)))
      ssims.append(np.asarray(metrics.ssim(out * 255.0, clear * 255.0)))
      if self.hazy_scores is None:
        hazy_psnrs.append(np.asarray(metrics.psnr(batch["hazy"] * 255.0, clear * 255.0)))
        hazy_ssims.append(np.asarray(metrics.ssim(batch["hazy"] * 255.0, clear * 255.0)))
      for i in range(min(n, self.grid_images - len(rows))):
        rows.append((batch["hazy"][i], out[i], clear[i]))
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


# ------------------------------------------------------------------ signals


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks after each step (save, then stop).

  Saving is collective in a multi-process job, so every process must stop after the
  same step: there JAX's preemption notifier catches SIGTERM (on whichever processes
  get it) and `reached` turns True on all of them at one step they agree on.
  """

  def __init__(self):
    self.signal: int | None = None
    self.multi_process = jax.process_count() > 1

  def __bool__(self) -> bool:
    return self.signal is not None

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process calls it after every step."""
    if self.multi_process and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
    return bool(self)

  @contextlib.contextmanager
  def installed(self):
    # A Python handler would replace JAX's notifier; and only the main thread may set one.
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      yield self
      return

    def handler(signum, frame):
      del frame
      self.signal = signum

    previous = signal.signal(signal.SIGTERM, handler)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------ workdir


def _check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir holding a run of another architecture; writes nothing."""
  path = workdir / checkpointing.TRAIN_CONFIG_FILE
  if path.is_file() and checkpointing.find_params(workdir) is not None:
    try:
      old = model_config(json.loads(path.read_text()).get("model", {})).to_dict()
    except (ValueError, TypeError, AttributeError) as e:
      raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e}); use a fresh "
                        "--workdir") from e
    new = model_config(config.model).to_dict()
    if old != new:
      diff = ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
      raise ConfigError(f"{workdir} holds a run of another architecture ({diff}); use a fresh "
                        "--workdir, or the same config.model")


def _check_crop(config: ml_collections.ConfigDict, source) -> None:
  """Refuses a crop larger than the training images (checked on the first one)."""
  crop = int(config.data.crop_size)
  if crop and len(source):
    h, w = np.shape(source[0]["hazy"])[:2]
    if crop > min(h, w):
      raise ConfigError(f"config.data.crop_size {crop} is larger than the {h}x{w} training "
                        "images; use a smaller crop_size, or 0 for whole images")


def _prepare_workdir(workdir: pathlib.Path) -> None:
  """Creates the workdir and makes sure files can be written there."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from e


def _record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Writes the training config of this (accepted) start as ``config.json``."""
  files.write_text(workdir / checkpointing.TRAIN_CONFIG_FILE,
                   config.to_json_best_effort(indent=2) + "\n")


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


def _initial_state(config: ml_collections.ConfigDict) -> TrainState:
  params = None
  if config.init_from:
    params = checkpoint.load(pathlib.Path(config.init_from).expanduser())
  try:
    return create_train_state(config, params)
  except ValueError as e:  # e.g. init_from weights of a different architecture
    raise ConfigError(str(e)) from e


def _mean(history: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


# ------------------------------------------------------------------ the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       ) -> dict[str, Any]:
  """Trains MI-Net as `config` says, in `workdir` (resuming it if it has checkpoints).

  Returns a summary: ``step`` reached, ``stopped_by`` (None, or "SIGTERM"), the
  last validation scores (``psnr``, ``ssim``, ``hazy_psnr``, ...), ``best_psnr``,
  ``steps_per_second`` and ``seconds``.
  """
  t_start = time.time()
  validate_config(config)
  sharding.maybe_initialize_distributed(bool(config.distributed))
  workdir = pathlib.Path(workdir).expanduser().absolute()
  _check_workdir_config(workdir, config)
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)

  train_source, eval_source = _sources(config)
  _check_crop(config, train_source)
  _prepare_workdir(workdir)  # Nothing is written before the start is accepted.
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  train_iter = _train_iterator(config, train_source, mesh)
  evaluator = Evaluator(config, eval_source, mesh)

  ckpts = checkpointing.Checkpoints(workdir, keep=int(config.keep_checkpoints),
                                    async_save=bool(config.async_checkpointing))
  resumed = ckpts.restore_newest_intact(abstract_train_state(config), replicated)
  _report_damaged(resumed, writer)
  resumed_from = resumed.step
  if resumed_from is not None:
    state = resumed.state
    _restore_iterator(train_iter, resumed.data)
    writer.write_event(resumed_from, "resume", from_step=resumed_from,
                       skipped_damaged=[d.step for d in resumed.damaged])
  else:
    state = sharding.replicate(_initial_state(config), mesh)
    writer.write_event(0, "start", init_from=config.init_from or None,
                       devices=mesh.devices.size, processes=jax.process_count())
  if jax.process_index() == 0:
    checkpointing.write_model_config(workdir, state.model_config)
    _record_config(workdir, config)

  schedule = learning_rate_schedule(config.optimizer)
  train_step = make_train_step(config.loss, schedule, replicated, sharding.batch_sharded(mesh))

  step = int(state.step)
  total = int(config.num_train_steps)
  last_scores: dict[str, float] = {}
  history: list[dict[str, float]] = []
  stop = _StopRequest()
  train_seconds, timed_steps = 0.0, 0

  def save(state: TrainState) -> None:
    meta = {"time": time.time(), **{f"eval_{k}": v for k, v in last_scores.items()}}
    ckpts.save(state, _iterator_state(train_iter), meta)

  def evaluate(state: TrainState) -> None:
    nonlocal last_scores
    scores, rows = evaluator(state)
    last_scores = scores
    writer.write_scalars(int(state.step), "eval", scores)
    writer.write_grid(int(state.step), rows)
    ckpts.save_best(state, scores)
    if jax.process_index() == 0:
      tqdm.write(f"step {int(state.step)}: validation PSNR {scores['psnr']:.2f} dB "
                 f"(hazy input {scores['hazy_psnr']:.2f} dB), SSIM {scores['ssim']:.4f}")

  bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  try:
    with stop.installed():
      while step < total:
        batch = sharding.global_batch(next(train_iter), mesh)
        t0 = time.time()
        state, step_metrics = train_step(state, batch)
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        step += 1
        if step > (resumed_from or 0) + 1:  # The first step also compiles.
          train_seconds += time.time() - t0
          timed_steps += 1
        # A non-finite gradient has already spoilt this step's update, even if the
        # loss (computed before it) is finite.
        if not (math.isfinite(step_metrics["loss"]) and math.isfinite(step_metrics["grad_norm"])):
          ckpts.wait()
          last_good = ckpts.latest_step()
          writer.write_event(step, "non_finite_loss", loss=step_metrics["loss"],
                             grad_norm=step_metrics["grad_norm"], last_checkpoint=last_good)
          raise NonFiniteLossError(
              f"the training loss became {step_metrics['loss']} (gradient norm "
              f"{step_metrics['grad_norm']}) at step {step}; training "
              f"stopped without saving. The last good checkpoint is step {last_good} in "
              f"{workdir / checkpointing.LATEST_DIR} (None: no checkpoint yet). Lower "
              "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm, then "
              "rerun: training resumes from that checkpoint.")
        history.append(step_metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4g}", psnr=f"{step_metrics['psnr']:.2f}")
        if step % int(config.log_every) == 0 or step == total:
          summary = _mean(history)
          if timed_steps:
            summary["steps_per_second"] = timed_steps / train_seconds
          writer.write_scalars(step, "train", summary)
          history = []
        if (int(config.eval_every) and step % int(config.eval_every) == 0) or step == total:
          evaluate(state)
        if step % int(config.checkpoint_every) == 0 or step == total:
          save(state)
        if stop.reached(step):
          save(state)
          writer.write_event(step, "stopped", signal="SIGTERM")
          if jax.process_index() == 0:
            tqdm.write(f"SIGTERM: saved step {step} in {workdir}; rerun to resume")
          break
  finally:
    bar.close()
    ckpts.wait()
    best_psnr = ckpts.best_psnr()
    ckpts.close()
    writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()
  return {
      "step": step,
      "stopped_by": "SIGTERM" if stop else None,
      **last_scores,
      "best_psnr": best_psnr,
      "steps_per_second": timed_steps / train_seconds if timed_steps else None,
      "seconds": time.time() - t_start,
  }
