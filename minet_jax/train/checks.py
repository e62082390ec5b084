"""Checks that refuse a training start before anything is written.

`validate_config` looks at the config alone; `check_workdir_config`, `check_crop`
and `prepare_workdir` at the config together with the workdir and the data it
would be used with. Each raises `ConfigError` naming the field and a fix.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np

from minet_jax import checkpoint
from minet_jax.config import model_config
from minet_jax.train import checkpointing
from minet_jax.train.step import LOSSES, parse_ynn_fusions


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
  if config.teacher and not (config.init_from if config.teacher == "init_from" else True):
    raise ConfigError("config.teacher='init_from' needs config.init_from (the weights whose "
                      "outputs are the targets)")
  if float(config.teacher_match_weight) < 0 or float(config.output_weight) < 0:
    raise ConfigError("config.teacher_match_weight and config.output_weight must be >= 0")
  if float(config.teacher_match_weight) and not config.teacher:
    raise ConfigError("config.teacher_match_weight > 0 needs config.teacher")
  if not float(config.output_weight):
    if not (config.teacher and float(config.teacher_match_weight)):
      raise ConfigError("config.output_weight = 0 leaves nothing to train unless a teacher's "
                        "blocks are matched (config.teacher, config.teacher_match_weight > 0)")
    if float(config.model.correction_weight):
      raise ConfigError("config.model.correction_weight needs the model's forward pass "
                        "(config.output_weight > 0)")
  scale = tuple(config.init_block_scale)
  if scale and (not config.init_from or not all(float(s) > 0 for s in scale)):
    raise ConfigError(f"config.init_block_scale {scale} needs config.init_from and one "
                      "positive factor per IM-block")
  if not 0 <= int(config.seed) < 2**31:
    raise ConfigError(f"config.seed must be in [0, 2**31), got {config.seed}")
  try:
    parse_ynn_fusions(config.xla_cpu_ynn_fusions)
  except ValueError as e:
    raise ConfigError(f"config.xla_cpu_ynn_fusions {e}") from e


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir holding a run of another architecture; writes nothing."""
  path = workdir / checkpointing.TRAIN_CONFIG_FILE
  if path.is_file() and checkpoint.find_params(workdir) is not None:
    try:
      old = model_config(json.loads(path.read_text()).get("model", {})).architecture()
    except (ValueError, TypeError, AttributeError) as e:
      raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e}); use a fresh "
                        "--workdir") from e
    new = model_config(config.model).architecture()
    if old != new:
      diff = ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
      raise ConfigError(f"{workdir} holds a run of another architecture ({diff}); use a fresh "
                        "--workdir, or the same config.model")


def check_crop(config: ml_collections.ConfigDict, source) -> None:
  """Refuses a crop larger than the training images (checked on the first one)."""
  crop = int(config.data.crop_size)
  if crop and len(source):
    h, w = np.shape(source[0]["hazy"])[:2]
    if crop > min(h, w):
      raise ConfigError(f"config.data.crop_size {crop} is larger than the {h}x{w} training "
                        "images; use a smaller crop_size, or 0 for whole images")


def prepare_workdir(workdir: pathlib.Path) -> None:
  """Creates the workdir and makes sure files can be written there."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from e
