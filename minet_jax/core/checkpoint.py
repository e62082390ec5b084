"""The on-disk format of MI-Net weights: `save`, `load`, `load_config`.

A checkpoint folder holds::

  minet_config.json   {"format_version", "model": ModelConfig fields but the
                      RUNTIME_FIELDS (conv_backend, precision), "model_sha256",
                      "weights_sha256"}
  weights/            the weights (orbax, float32)

The output is defined by the architecture and the weights, so both are checksummed:
``model_sha256`` is the SHA-256 of the ``model`` record (its canonical JSON), and
``weights_sha256`` that of the weights (`minet_jax.core.params.weights_checksum`).
`load` verifies both, refuses non-finite weights (naming the tensor) and refuses
folders written by a newer ``format_version`` than this code reads. Format 1 (before
``model_sha256``) is still read, with the weights' checksum verified when recorded;
from format 2 on both checksums are required, so deleting one is noticed too.

A training workdir (``train.py --workdir``) has no ``weights/``: its
``minet_config.json`` also names, under ``weights_in``, the subfolders holding its
weights as orbax step folders, in the order to try them::

  "weights_in": ["best", "checkpoints"]    (what `minet_jax.train` writes)
  <folder>/<step>/params/   the weights (orbax, float32)
  <folder>/<step>/meta/     a JSON record: "weights_sha256", the validation "psnr"
                            (when validated), the architecture ("model")

`load` reads the newest step of the first folder, else (missing or refused, with a
warning) the next newest usable one, folder after folder. The folder names are the
trainer's (`minet_jax.train.checkpointing`); this module only follows the record.
Workdirs written before ``weights_in`` existed lack it and are read as they were laid
out then, `OLDER_WORKDIR_FOLDERS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from minet_jax.core import files
from minet_jax.core.config import RUNTIME_FIELDS, ModelConfig, is_count, model_config
from minet_jax.core.params import (Params, abstract_weights, non_finite, shape_mismatch,
                              stringify_keys, weight_shapes, weights_checksum)

CONFIG_FILE = "minet_config.json"
WEIGHTS_DIR = "weights"
# 2: minet_config.json also records model_sha256, and both checksums are required.
FORMAT_VERSION = 2
# A training workdir's weights: orbax step folders, each holding the weights
# (PARAMS_ITEM) and a JSON record (META_ITEM), in the subfolders its record lists
# under WEIGHTS_IN_KEY.
WEIGHTS_IN_KEY = "weights_in"
PARAMS_ITEM = "params"
META_ITEM = "meta"
# Where the weights of a workdir without WEIGHTS_IN_KEY (written by older versions) are:
# the best checkpoint's folder, then the resumable checkpoints'. A fact of that older
# format, fixed: what training writes today is its own choice, recorded in each workdir.
OLDER_WORKDIR_FOLDERS = ("best", "checkpoints")


class CheckpointError(OSError):
  """A checkpoint folder is missing, incomplete or unreadable."""


def one_line_error(e: BaseException) -> str:
  """``Type: message`` on one line; tensorstore's long JSON spec (after the cause) is cut."""
  message = str(e).split(" [tensorstore_spec=")[0].strip()
  first = message.splitlines()[0] if message else ""
  return f"{type(e).__name__}: {first[:300]}"


# ------------------------------------------------------------------ config file


def model_checksum(record: Any) -> str:
  """SHA-256 of an architecture record's canonical JSON (sorted keys, no spaces): the
  same for the record written and for the record read back from the file."""
  text = json.dumps(record, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_record(cfg: ModelConfig, weights: Any = None,
                  weights_in: Sequence[str] = ()) -> dict:
  """The contents of ``minet_config.json`` (with the weights' checksum when given, and
  a training workdir's `WEIGHTS_IN_KEY` when `weights_in` names its folders)."""
  # The architecture and the solve settings the weights were trained with, without the
  # RUNTIME_FIELDS: which backend runs the convolutions is the loading machine's choice
  # (a loaded config gets the default, "auto").
  model = cfg.stored()
  meta = {"format_version": FORMAT_VERSION, "model": model,
          "model_sha256": model_checksum(model)}
  if weights is not None:
    meta["weights_sha256"] = weights_checksum(weights)
  if weights_in:
    meta[WEIGHTS_IN_KEY] = _checked_folders(
        weights_in if isinstance(weights_in, str) else list(weights_in))
  return meta


def write_config(folder: str | os.PathLike, cfg: ModelConfig, weights: Any = None,
                 weights_in: Sequence[str] = ()) -> None:
  """Writes ``minet_config.json`` into `folder` (whole, never half-written); a training
  workdir passes `weights_in`, the subfolders of its weight steps in the order `load`
  is to try them."""
  files.write_text(pathlib.Path(folder) / CONFIG_FILE,
                   json.dumps(config_record(cfg, weights, weights_in), indent=2) + "\n")


def _checked_folders(value: Any) -> list[str]:
  """`value` if it is a non-empty list of plain subfolder names, else ValueError."""
  if (not isinstance(value, list) or not value
      or not all(isinstance(name, str) and name not in ("", ".", "..")
                 and "/" not in name and "\\" not in name for name in value)):
    raise ValueError(f"{WEIGHTS_IN_KEY} must be a non-empty list of subfolder names, "
                     f"got {value!r}")
  return value


def weight_folders(meta: dict) -> tuple[str, ...] | None:
  """The subfolders holding a training workdir's weight steps, in the order to try
  them, as the record ``meta`` names them; None when it names none (a checkpoint
  folder, or a workdir of an older version). ValueError when malformed."""
  if WEIGHTS_IN_KEY in meta:
    return tuple(_checked_folders(meta[WEIGHTS_IN_KEY]))
  return None


def _enclosing_workdir(path: pathlib.Path) -> pathlib.Path | None:
  """The training workdir one of whose weight folders holds `path` (the folder, a step
  folder or an item of one), if any."""
  for workdir in list(path.parents)[:3]:
    if not (workdir / CONFIG_FILE).is_file():
      continue
    try:
      folders = weight_folders(json.loads((workdir / CONFIG_FILE).read_text()))
    except (ValueError, TypeError, RecursionError, OSError):
      folders = None  # The error is `load`'s to report, once given the workdir.
    if path.relative_to(workdir).parts[0] in (folders or OLDER_WORKDIR_FOLDERS):
      return workdir
  return None


def _read_meta(path: pathlib.Path) -> dict:
  meta_file = path / CONFIG_FILE
  if not meta_file.is_file():
    workdir = _enclosing_workdir(path)
    if workdir is not None:
      raise CheckpointError(f"{path} is part of the training workdir {workdir}; pass the "
                            f"workdir itself ({workdir}): its best, else latest, weights load")
  if path.is_file():
    raise CheckpointError(f"{path} is a file, not a checkpoint folder (an authors' .pth "
                          "loads with minet_jax.load or --ckpt FILE.pth)")
  if not path.is_dir():
    what = "file" if path.suffix.lower() in (".pth", ".pt") else "checkpoint folder"
    raise CheckpointError(f"{what} {path} does not exist")
  if not meta_file.is_file():
    raise CheckpointError(f"{path} is not a minet-jax checkpoint: {CONFIG_FILE} is missing "
                          "(pass a checkpoint folder, a training workdir or an authors' .pth)")
  try:
    meta = json.loads(meta_file.read_text())
    version = meta["format_version"]
  except RecursionError:
    raise CheckpointError(f"{meta_file} is corrupt: its JSON is nested too deeply to "
                          "be a minet-jax record") from None
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_file} is corrupt: {one_line_error(e)}") from e
  if not is_count(version):
    raise CheckpointError(f"{meta_file} is corrupt: format_version {version!r}")
  if version > FORMAT_VERSION:
    raise CheckpointError(f"{meta_file} has format_version {version}, newer than the "
                          f"{FORMAT_VERSION} this minet-jax reads; upgrade minet-jax to load it")
  if version >= 2:
    recorded = meta.get("model_sha256")
    if not isinstance(recorded, str):
      raise CheckpointError(f"{meta_file} is damaged or was edited: its model_sha256 is "
                            "missing, so the architecture it records cannot be trusted")
    if model_checksum(meta.get("model")) != recorded:
      raise CheckpointError(f"{meta_file} is damaged or was edited: its model record does "
                            "not match the checksum saved with it, so it may not describe "
                            "the model the weights belong to; restore the file")
  try:
    weight_folders(meta)
  except ValueError as e:
    raise CheckpointError(f"{meta_file} is corrupt: {e}") from e
  return meta


def config_from_record(record: Any) -> ModelConfig:
  """The `ModelConfig` of a stored architecture record (``minet_config.json``'s
  ``model``, or a training step's); ValueError/TypeError when it is not one."""
  if not isinstance(record, dict):
    raise TypeError(f"the model record is a {type(record).__name__}, not an object")
  # Checkpoints written before RUNTIME_FIELDS existed may carry one: how to run the
  # model is the loading machine's choice, so it gets the default.
  return model_config({k: v for k, v in record.items() if k not in RUNTIME_FIELDS})


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` stored in a checkpoint folder written by `save`."""
  path = pathlib.Path(path).expanduser()
  meta = _read_meta(path)
  try:
    return config_from_record(meta["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path / CONFIG_FILE} is corrupt: {e}") from e


# ------------------------------------------------------------------ training workdirs


def _steps(folder: pathlib.Path) -> list[int]:
  """Finalised orbax step folders (orbax writes to a temporary name and renames)."""
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def step_params(folder: str | os.PathLike) -> list[pathlib.Path]:
  """The ``params/`` folders of the finalised orbax steps in `folder`, newest first."""
  folder = pathlib.Path(folder)
  found = (folder / str(step) / PARAMS_ITEM for step in reversed(_steps(folder)))
  return [candidate for candidate in found if candidate.is_dir()]


def _workdir_params(workdir: pathlib.Path, meta: dict) -> list[pathlib.Path]:
  return [params for sub in weight_folders(meta) or OLDER_WORKDIR_FOLDERS
          for params in step_params(workdir / sub)]


def workdir_params(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """The ``params/`` folders of a training workdir in the order `load` tries them: the
  steps of each folder its record names, newest first. Raises `CheckpointError` when
  the workdir's ``minet_config.json`` is missing or damaged."""
  workdir = pathlib.Path(workdir)
  return _workdir_params(workdir, _read_meta(workdir))


def find_params(workdir: str | os.PathLike) -> pathlib.Path | None:
  """The ``params/`` folder `load` tries first in a training workdir (its best)."""
  found = workdir_params(workdir)
  return found[0] if found else None


def step_record_file(params_dir: str | os.PathLike) -> pathlib.Path:
  """The file of the JSON record saved beside a step's ``params/`` (its ``meta/``)."""
  return pathlib.Path(params_dir).parent / META_ITEM / "metadata"


def step_record(params_dir: str | os.PathLike) -> dict:
  """The JSON record saved beside a step's ``params/`` (its ``meta/``); {} if unreadable."""
  meta_file = step_record_file(params_dir)
  try:
    record = json.loads(meta_file.read_text())
  except (OSError, ValueError, RecursionError):
    return {}
  return record if isinstance(record, dict) else {}


def stored_shapes(params_dir: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]] | None:
  """Flat {path: shape} of the weights in an orbax folder, read from its metadata
  alone (None when that is unreadable: the folder is damaged)."""
  import orbax.checkpoint as ocp

  try:
    return weight_shapes(ocp.PyTreeCheckpointHandler().metadata(
        pathlib.Path(params_dir).absolute()).tree)
  except Exception:  # orbax raises many types for missing or damaged metadata.
    return None


def recorded_checksum(params_dir: str | os.PathLike) -> str | None:
  """The weights' SHA-256 saved beside a step's ``params/`` (in its ``meta/``), if any."""
  return step_record(params_dir).get("weights_sha256")


# ------------------------------------------------------------------ save / load


def weights_to_save(weights: Any) -> dict:
  """The weights as float32 numpy arrays; refuses non-float dtypes and non-finite values."""

  def convert(path, leaf):
    array = np.asarray(leaf)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
      name = ".".join(str(k.key) for k in path)
      raise TypeError(f"weight {name} has dtype {array.dtype}; MI-Net weights are floating "
                      "point (refusing to cast)")
    return array.astype(np.float32)

  arrays = jax.tree_util.tree_map_with_path(convert, stringify_keys(weights))
  problem = non_finite(arrays)
  if problem:
    raise ValueError(f"refusing to save non-finite weights: {problem}")
  return arrays


def _is_os_metadata(name: str) -> bool:
  """A file a file manager leaves in any folder it shows (macOS, Windows): not the user's."""
  return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


def check_destination(path: pathlib.Path, *, replace: bool, how: str) -> None:
  """Refuses a folder a model must not be saved to (`FileExistsError`): a file; a
  non-empty folder unless ``replace`` (``how`` says how to ask for that); and, even
  then, a folder that holds anything but a saved model, since replacing it deletes all
  it holds (a file manager's ``.DS_Store`` or ``Thumbs.db`` excepted)."""
  if not path.exists():
    return
  if not path.is_dir():
    raise FileExistsError(f"{path} is a file; a model is saved as a folder: name a folder")
  held = sorted(p.name for p in path.iterdir() if not _is_os_metadata(p.name))
  if not held:
    return
  others = [name for name in held if name not in (WEIGHTS_DIR, CONFIG_FILE)]
  if others or not is_saved_model(path):
    named = others or held  # A model's files, but not all of them: named too.
    shown = ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")
    raise FileExistsError(f"{path} holds files that are not a saved model ({shown}); "
                          "replacing it would delete them, so only a folder that holds a "
                          "saved model alone is replaced: choose another folder")
  if not replace:
    raise FileExistsError(f"{path} exists and is not empty; {how}")


def save(params: Params, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` to the folder `path` (orbax weights + JSON config).

  The folder is written beside its destination and renamed into place, so an
  interrupted save leaves nothing half-written. An existing non-empty folder is
  refused unless ``overwrite=True``, and a folder that holds anything but a saved
  model always is (`check_destination`). Weights are stored as float32 with their
  SHA-256 in ``minet_config.json``; non-float (complex, integer) or non-finite
  weights are refused.
  """
  import orbax.checkpoint as ocp  # Deferred: orbax's import is slow and apply() needs none of it.

  if not isinstance(params, Params):
    raise TypeError(f"save takes minet_jax.Params (weights and config), got "
                    f"{type(params).__name__}; the weights alone do not say their architecture")
  path = pathlib.Path(path).expanduser().absolute()
  check_destination(path, replace=overwrite, how="pass overwrite=True to replace it")
  weights = weights_to_save(params.weights)
  with files.replacing(path, folder=True) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / WEIGHTS_DIR, weights)
    write_config(tmp, params.config, weights)
  return path


def quiet_abandoned_reads() -> None:
  """Silences orbax's stray reports of work abandoned after a failed read or write.

  When one read of a damaged checkpoint fails, orbax closes its event loop while
  tensorstore is still finishing the other reads; their completions then report
  ``RuntimeError('Event loop is closed')`` through `sys.unraisablehook`, as
  tracebacks printed long after `load` raised its own error. A failed save (a full
  disk) leaves coroutines that die at interpreter exit with ``ImportError: ...
  Python is likely shutting down``, dozens of tracebacks after the real error.
  Exactly those two are dropped; everything else goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_reports", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    if isinstance(value, ImportError) and "Python is likely shutting down" in str(value):
      return
    previous(unraisable)

  hook._drops_closed_loop_reports = True
  sys.unraisablehook = hook


def read_weights(weights_dir: str | os.PathLike, cfg: ModelConfig,
                 checksum: str | None = None) -> dict:
  """Restores the weights of architecture `cfg` from an orbax folder and checks them.

  Raises `CheckpointError` when they are unreadable, do not fit `cfg`, differ from
  `checksum` (when given) or are not finite.
  """
  import orbax.checkpoint as ocp

  weights_dir = pathlib.Path(weights_dir)
  quiet_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      weights = ckptr.restore(weights_dir.absolute(), abstract_weights(cfg))
  except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, ...).
    raise CheckpointError(f"could not read the weights in {weights_dir}: "
                          f"{one_line_error(e)}") from e
  # orbax restores what is on disk even when it disagrees with the target; check it here.
  problem = shape_mismatch(weights, cfg)
  if problem:
    raise CheckpointError(f"could not read the weights in {weights_dir}: they do not fit "
                          f"the architecture in {CONFIG_FILE} ({problem})")
  if checksum is not None and weights_checksum(weights) != checksum:
    raise CheckpointError(f"the weights in {weights_dir} do not match the checksum recorded "
                          "when they were saved: the files were changed or damaged")
  problem = non_finite(weights)
  if problem:
    raise CheckpointError(f"the weights in {weights_dir} are not usable: {problem}")
  return weights


def is_saved_model(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a folder written by `save` (its weights and config), not a
  training workdir."""
  path = pathlib.Path(path).expanduser()
  return (path / WEIGHTS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def load(path: str | os.PathLike) -> Params:
  """Reads a checkpoint folder written by `save` (or by the converter), or a training
  workdir (``train.py --workdir``: its best-validation, else latest, weights).

  Raises `CheckpointError` when the folder is missing, from a newer format, or its
  weights are unreadable, do not fit the architecture, do not match their recorded
  checksum (damaged files), or are not finite (naming the tensor). In a workdir whose
  best weights are refused so, the newest usable ones after them (in the order of its
  ``weights_in``: the resumable checkpoints) are loaded instead, with a warning naming
  what was refused.
  """
  return _load(path, stacklevel=3)[0]


def load_with_source(path: str | os.PathLike) -> tuple[Params, pathlib.Path | None]:
  """`load`, and the training step's ``params/`` folder it read in a training workdir
  (its parent's name is the step); None for a checkpoint folder written by `save`."""
  return _load(path, stacklevel=3)


def _load(path: str | os.PathLike, *, stacklevel: int) -> tuple[Params, pathlib.Path | None]:
  """`load_with_source`; a fallback warning points `stacklevel` frames up."""
  given = pathlib.Path(path).expanduser()
  path = given.absolute()
  try:
    meta = _read_meta(path)
  except CheckpointError as e:
    # A bare name that is no folder may be a release's ("its"), fetched by `pretrained`.
    if str(given).isidentifier() and not path.exists():
      raise CheckpointError(f"{e}; a released model by name (e.g. 'its') loads with "
                            "minet_jax.pretrained") from None
    raise
  cfg = load_config(path)
  weights_dir = path / WEIGHTS_DIR
  # From format 2 on the weights' checksum is always written: a missing one was removed.
  required = meta["format_version"] >= 2
  folders = weight_folders(meta)
  candidates = _workdir_params(path, meta) if folders or not weights_dir.exists() else []
  if folders and not candidates:
    raise CheckpointError(f"no weights in the training workdir {path} yet: none of "
                          f"{', '.join(folders)} holds a finished step")
  if not candidates:
    checksum = meta.get("weights_sha256")
    if required and not isinstance(checksum, str) and weights_dir.exists():
      raise CheckpointError(f"{path / CONFIG_FILE} is damaged or was edited: its "
                            "weights_sha256 is missing, so the weights cannot be verified")
    return Params(weights=read_weights(weights_dir, cfg, checksum), config=cfg), None
  refused = []
  for folder in candidates:
    try:
      weights = _read_step_weights(folder, cfg, required)
    except CheckpointError as e:
      refused.append(str(e))
      continue
    if refused:
      warnings.warn(f"{refused[0]}; loaded the newest usable weights instead, {folder}"
                    + (f" ({len(refused) - 1} more refused)" if len(refused) > 1 else ""),
                    stacklevel=stacklevel)
    return Params(weights=weights, config=cfg), folder
  raise CheckpointError(f"no usable weights in {path}: {refused[0]}"
                        + (f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""))


def _read_step_weights(params_dir: pathlib.Path, cfg: ModelConfig,
                       require_checksum: bool) -> dict:
  """The weights of one step of a training workdir; refuses a step whose recorded
  validation PSNR is not finite (its weights give NaN outputs), or without a
  recorded checksum when one is required."""
  record = step_record(params_dir)
  psnr = record.get("psnr")
  if isinstance(psnr, (int, float)) and not np.isfinite(psnr):
    raise CheckpointError(f"the weights in {params_dir} are not usable: their validation "
                          f"PSNR is {psnr}")
  checksum = record.get("weights_sha256")
  if require_checksum and not isinstance(checksum, str):
    raise CheckpointError(f"the weights in {params_dir} cannot be verified: the checksum "
                          "recorded with them (meta/) is missing or unreadable")
  return read_weights(params_dir, cfg, checksum)
