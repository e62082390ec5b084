"""Checks that refuse a training start before anything is written.

`validate_config` looks at the config alone; `check_workdir_config`, `check_crop`
and `prepare_workdir` at the config together with the workdir and the data it
would be used with. Each raises `ConfigError` naming the field and a fix.
"""

from __future__ import annotations

import difflib
import pathlib

import jax
import ml_collections
import numpy as np

from minet_jax import hub
from minet_jax.core import checkpoint
from minet_jax.core.config import ModelConfig, is_count, is_positive_number, model_config
from minet_jax.core.params import shapes_mismatch
from minet_jax.train import checkpointing, defaults
from minet_jax.train.inputs import synthetic_config
from minet_jax.train.state import abstract_train_state, check_optimizer
from minet_jax.train.step import LOSSES, TEACHER_INPUTS, parse_ynn_fusions


class ConfigError(ValueError):
  """The config, or the workdir it is used with, cannot be trained; the message says why."""


def unknown_fields(config: ml_collections.ConfigDict,
                   known: ml_collections.ConfigDict | None = None, prefix: str = "config."
                   ) -> list[str]:
  """The fields of ``config`` that the defaults (`defaults.get_config`) lack, each with
  the closest known name when there is one: a config file's typo (``num_train_step``)
  would otherwise add a field nothing reads and train with the default."""
  known = defaults.get_config() if known is None else known
  found = []
  for key in config.keys():
    if key not in known:
      close = difflib.get_close_matches(key, list(known.keys()), n=1)
      found.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    elif (isinstance(config[key], ml_collections.ConfigDict)
          and isinstance(known[key], ml_collections.ConfigDict)):
      found += unknown_fields(config[key], known[key], f"{prefix}{key}.")
  return found


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Raises `ConfigError` naming the field and a fix for values training cannot use;
  returns ``config.model`` parsed, the `ModelConfig` the run is to use."""
  unknown = unknown_fields(config)
  if unknown:
    raise ConfigError(f"unknown config field{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(unknown)}: no training reads it; see "
                      "minet_jax/train/defaults.py for the fields that exist")
  try:
    cfg = model_config(config.model)  # Checks the architecture fields.
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from e
  if config.loss not in LOSSES:
    raise ConfigError(f"config.loss must be one of {LOSSES}, got {config.loss!r}")
  data = config.data
  # A config file can put a bool where a count goes (ml_collections accepts it for an
  # int field): True would run one step. Counts are integers, bools are not.
  counts = {"num_train_steps": 1, "log_every": 1, "checkpoint_every": 1,
            "keep_checkpoints": 1, "eval_every": 0, "grid_images": 0,
            "data.batch_size": 1, "data.eval_batch_size": 1, "data.num_eval_images": 0,
            "data.worker_count": 0}
  for name, minimum in counts.items():
    value = data[name[5:]] if name.startswith("data.") else config[name]
    if not is_count(value, minimum):
      raise ConfigError(f"config.{name} must be an integer >= {minimum}, got {value!r}")
  if not is_count(data.crop_size, 0) or data.crop_size % 2:
    raise ConfigError(f"config.data.crop_size must be 0 (full images) or an even number of "
                     f"pixels (the encoder halves them), got {data.crop_size!r}")
  if config.teacher == "init_from" and not config.init_from:
    raise ConfigError("config.teacher='init_from' needs config.init_from (the weights whose "
                      "outputs are the targets)")
  for name in ("teacher_match_weight", "output_weight"):
    weight = config[name]
    if isinstance(weight, bool) or not (weight == 0 or is_positive_number(weight)):
      raise ConfigError(f"config.{name} must be a finite number >= 0, got {weight!r}")
  match_steps = config.teacher_match_steps
  if not is_count(match_steps):
    raise ConfigError(f"config.teacher_match_steps must be an integer >= 1, got {match_steps!r}")
  if config.teacher_inputs not in TEACHER_INPUTS:
    raise ConfigError(f"config.teacher_inputs must be one of {TEACHER_INPUTS}, got "
                      f"{config.teacher_inputs!r}")
  if float(config.teacher_match_weight) and not config.teacher:
    raise ConfigError("config.teacher_match_weight > 0 needs config.teacher")
  if not float(config.output_weight):
    if not (config.teacher and float(config.teacher_match_weight)):
      raise ConfigError("config.output_weight = 0 leaves nothing to train unless a teacher's "
                        "blocks are matched (config.teacher, config.teacher_match_weight > 0)")
    if float(config.model.correction_weight):
      raise ConfigError("config.model.correction_weight needs the model's forward pass "
                        "(config.output_weight > 0)")
  # A release name, or a .pth that is not there (a mistyped path, not a run to train).
  missing_pth = (str(config.init_from).endswith(".pth")
                 and not pathlib.Path(config.init_from).expanduser().exists())
  if config.init_from_config and (not config.init_from or hub.names_release(config.init_from)
                                  or missing_pth):
    raise ConfigError(f"config.init_from_config {config.init_from_config!r} trains "
                      "config.init_from, which must then be a training workdir, got "
                      f"{config.init_from!r}")
  if config.teacher_inputs != "teacher" and not (config.teacher
                                                 and float(config.teacher_match_weight)):
    raise ConfigError(f"config.teacher_inputs={config.teacher_inputs!r} needs the teacher "
                      "matching term (config.teacher, config.teacher_match_weight > 0)")
  if trained_blocks(config, cfg.num_blocks) is not None and not config.init_from:
    raise ConfigError("config.train_blocks needs config.init_from (the weights the other "
                      "parameters keep)")
  sources = tuple(config.init_blocks_from)
  if sources and (not config.init_from or len(sources) != cfg.num_blocks
                  or not all(isinstance(s, str) for s in sources)):
    raise ConfigError(f"config.init_blocks_from {sources} needs config.init_from and one "
                      f"entry per IM-block ({cfg.num_blocks}): \"\" or a model for that block")
  scale = tuple(config.init_block_scale)
  if scale and (not config.init_from or len(scale) != cfg.num_blocks
                or not all(is_positive_number(s) for s in scale)):
    raise ConfigError(f"config.init_block_scale {scale} needs config.init_from and one "
                      f"positive factor per IM-block ({cfg.num_blocks})")
  if not is_count(config.seed, 0) or config.seed >= 2**31:
    raise ConfigError(f"config.seed must be an integer in [0, 2**31), got {config.seed!r}")
  try:
    parse_ynn_fusions(config.xla_cpu_ynn_fusions)
  except ValueError as e:
    raise ConfigError(f"config.xla_cpu_ynn_fusions {e}") from e
  try:
    synthetic_config(config.data)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.data.synthetic: {e}") from e
  try:
    check_optimizer(config.optimizer)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{e}") from e
  try:
    # Builds the model and optimizer without FLOPs: what they check of their
    # settings (e.g. model.unroll, init_tail) fails here, before any write.
    abstract_train_state(config, cfg)
  except (ValueError, TypeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f"config: {first}") from e
  return cfg


def trained_blocks(config: ml_collections.ConfigDict, num_blocks: int) -> tuple[int, ...] | None:
  """``config.train_blocks`` (IM-block numbers from 1) as the 0-based indices the
  training step takes, or None (train everything) when it is empty."""
  blocks = tuple(config.train_blocks)
  if not blocks:
    return None
  if (not all(is_count(b) and b <= num_blocks for b in blocks)
      or len(set(blocks)) != len(blocks)):
    raise ConfigError(f"config.train_blocks must be distinct IM-block numbers from 1 to "
                      f"{num_blocks} (() trains the whole model), got {blocks!r}")
  return tuple(b - 1 for b in blocks)


def architecture_differences(old: dict, new: dict) -> str:
  """The fields two `ModelConfig.architecture` records differ in, on one line."""
  return ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def _another_architecture(workdir: pathlib.Path, what: str) -> ConfigError:
  return ConfigError(f"{workdir} holds checkpoints of another architecture ({what}); use a "
                     "fresh --workdir, or the same config.model")


def check_workdir_config(workdir: pathlib.Path, cfg: ModelConfig) -> None:
  """Refuses a workdir holding checkpoints of another architecture than `cfg` (the
  run's ``config.model``); writes nothing.

  The architecture is read from what was saved with the checkpoints, not from the
  training config of the latest start (``config.json``, which may be missing or
  edited): ``minet_config.json``, each step's recorded architecture, and the shapes
  of each step's weights. A folder written by `minet_jax.save` is refused too.
  """
  if checkpoint.is_saved_model(workdir):
    raise ConfigError(f"{workdir} is a saved model (minet_jax.save), not a training workdir; "
                      "train in another --workdir, with --config.init_from to start from it")
  folders = checkpointing.weight_params(workdir)
  if not folders:
    return
  new = cfg.architecture()
  records: list[tuple[pathlib.Path, ModelConfig]] = []
  model_file = workdir / checkpoint.CONFIG_FILE
  if model_file.exists():
    try:
      records.append((model_file, checkpoint.load_config(workdir)))
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"{e}; restore it, or use a fresh --workdir") from e
  for folder in folders:
    record = checkpoint.step_record(folder).get("model")
    try:
      records.append((folder, checkpoint.config_from_record(record)))
    except (ValueError, TypeError):
      pass  # Not recorded by older versions; a damaged meta is the resume's to find.
  for where, stored in records:
    old = stored.architecture()
    if old != new:
      raise _another_architecture(workdir, f"{architecture_differences(old, new)}, says {where}")
  for folder in folders:
    shapes = checkpoint.stored_shapes(folder)
    problem = shapes_mismatch(shapes, cfg) if shapes is not None else None
    if problem:
      raise _another_architecture(workdir, f"the weights in {folder} do not fit config.model: "
                                  f"{problem}")


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
