"""Converts the authors' PyTorch checkpoint into a minet-jax checkpoint folder.

    python -m minet_jax.convert model_ITS.pth checkpoints/minet_its

The ``.pth`` is read by `minet_jax.convert.torch_pickle` (no torch import; nothing
the pickle names is executed), its tensors are mapped to minet-jax names and
layouts by `minet_jax.convert.torch_names`, and the result is written with
`minet_jax.save`, config included (the released architecture, which expects
BGR 0..255 inputs internally; `minet_jax.apply` still takes RGB in [0, 1]).
Every tensor's name, shape and dtype is checked against the architecture
before any tensor data is read -- missing, unexpected, mis-shaped and
non-float ones are reported by name -- and reading is capped at a small
multiple of the architecture's size (`read_limit`), so a hostile or broken file
cannot exhaust memory. Non-finite weights are refused too. A failed conversion
leaves nothing behind, and a successful one appears atomically.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from minet_jax.core import checkpoint, files
from minet_jax.convert import torch_names, torch_pickle
from minet_jax.core.config import ConfigLike, ModelConfig, model_config
from minet_jax.core.params import Params, flat_weights, param_shapes


def released_config() -> ModelConfig:
  """The architecture of the authors' released ITS model (BGR 0..255 inputs)."""
  return ModelConfig(input_format="bgr255")


def read_limit(config: ConfigLike = None) -> int:
  """Bytes the converter may read: the architecture's weights stored as float64,
  twice (storages and their copies), plus 1 MiB. About 11 MB for the released model."""
  cfg = released_config() if config is None else model_config(config)
  elements = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
  return 2 * 8 * elements + (1 << 20)


def weights_from_checkpoint(checkpoint_path: str | os.PathLike,
                            config: ConfigLike = None) -> Params:
  """Reads and maps a PyTorch checkpoint into `Params` without writing anything.

  Names, shapes and dtypes are checked before any tensor data is read, and no
  more than `read_limit` bytes are read.

  Raises:
    torch_pickle.UnsafePickleError: the file tries to run code.
    torch_pickle.CheckpointFormatError: not a readable PyTorch checkpoint.
    torch_names.StateDictMismatch: tensors missing, unexpected, mis-shaped, not
      floating point, or holding NaN or infinite values.
  """
  cfg = released_config() if config is None else model_config(config)
  expected = param_shapes(cfg)
  with torch_pickle.open_state_dict(checkpoint_path) as lazy:
    torch_names.check_state_dict(lazy, cfg, expected_shapes=expected)
    try:
      state_dict = torch_pickle.read_tensors(lazy, max_bytes=read_limit(cfg))
    except torch_pickle.CheckpointFormatError as e:
      raise torch_pickle.CheckpointFormatError(f"{checkpoint_path}: {e}") from e
  weights = torch_names.weights_from_torch_state_dict(state_dict, cfg, expected_shapes=expected)
  return Params(weights=jax.tree.map(jnp.asarray, weights), config=cfg)


def convert(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            config: ConfigLike = None, force: bool = False) -> Params:
  """Converts ``checkpoint_path`` (.pth) into the checkpoint folder ``out_dir``.

  An existing non-empty ``out_dir`` is refused unless ``force``, and one that holds
  anything but a saved model always is (`checkpoint.check_destination`). The folder is
  written beside ``out_dir``, read back and compared tensor by tensor, and only
  then renamed into place: a conversion that fails at any point leaves no
  folder behind (and, with ``force``, the old one untouched).
  """
  out_dir = pathlib.Path(out_dir).expanduser()
  checkpoint.check_destination(out_dir, replace=force, how="choose another folder or pass "
                               "--force (force=True) to replace it")
  source = pathlib.Path(checkpoint_path).expanduser().resolve()
  if out_dir.is_dir() and out_dir.resolve() in source.parents:
    raise ValueError(f"refusing to replace {out_dir}: it holds the checkpoint being converted "
                     f"({checkpoint_path}); choose another folder")
  params = weights_from_checkpoint(checkpoint_path, config)
  with files.replacing(out_dir, folder=True) as staging:
    checkpoint.save(params, staging, overwrite=True)
    reloaded = checkpoint.load(staging)
    written, read = flat_weights(params.weights), flat_weights(reloaded.weights)
    bad = [".".join(k) for k in written
           if k not in read or not np.array_equal(np.asarray(written[k]), np.asarray(read[k]))]
    if bad or reloaded.config.stored() != params.config.stored():
      raise RuntimeError(f"{staging} does not read back what was written: {bad or 'config'}")
  return params


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m minet_jax.convert",
      description="Convert the authors' MI-Net PyTorch checkpoint (e.g. model_ITS.pth) into a "
                  "minet-jax checkpoint folder, without PyTorch.")
  parser.add_argument("checkpoint", help="PyTorch .pth file (legacy or zip format)")
  parser.add_argument("out_dir", help="checkpoint folder to create (must not exist or be empty)")
  parser.add_argument("--force", action="store_true",
                      help="replace out_dir if it already holds a converted or saved "
                           "model (and nothing else)")
  args = parser.parse_args(argv)
  try:
    params = convert(args.checkpoint, args.out_dir, force=args.force)
  except (OSError, ValueError, torch_pickle.UnsafePickleError,
          torch_pickle.CheckpointFormatError, torch_names.StateDictMismatch) as e:
    # OSError: missing file, taken or unwritable folder; ValueError: a folder that holds
    # the input or the current folder.
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.checkpoint} -> {args.out_dir}: "
        f"{len(jax.tree.leaves(params.weights))} tensors, {params.num_params():,} parameters, "
        f"input_format={params.config.input_format}")
  return 0

