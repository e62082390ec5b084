"""Converts the authors' PyTorch checkpoint into a minet-jax checkpoint folder.

    python -m minet_jax.convert model_ITS.pth checkpoints/minet_its

The ``.pth`` is read by `minet_jax.torch_pickle` (no torch import; nothing
the pickle names is executed), its tensors are mapped to minet-jax names and
layouts by `minet_jax.torch_names`, and the result is written with
`minet_jax.save`, config included (the released architecture, which expects
BGR 0..255 inputs internally; `minet_jax.apply` still takes RGB in [0, 1]).
Every tensor is checked first -- missing, unexpected and mis-shaped ones are
reported by name -- so a failed conversion writes nothing, and a successful one
appears atomically.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from minet_jax import api, torch_names, torch_pickle
from minet_jax.config import ConfigLike, ModelConfig, model_config


def released_config() -> ModelConfig:
  """The architecture of the authors' released ITS model (BGR 0..255 inputs)."""
  return ModelConfig(input_format="bgr255")


def weights_from_checkpoint(checkpoint_path: str | os.PathLike,
                            config: ConfigLike = None) -> api.Params:
  """Reads and maps a PyTorch checkpoint into `Params` without writing anything.

  Raises:
    torch_pickle.UnsafePickleError: the file tries to run code.
    torch_pickle.CheckpointFormatError: not a readable PyTorch checkpoint.
    torch_names.StateDictMismatch: tensors missing, unexpected or mis-shaped.
  """
  cfg = released_config() if config is None else model_config(config)
  state_dict = torch_pickle.load_state_dict(checkpoint_path)
  weights = torch_names.weights_from_torch_state_dict(
      state_dict, cfg, expected_shapes=api.param_shapes(cfg))
  return api.Params(weights=jax.tree.map(jnp.asarray, weights), config=cfg)


def convert(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            config: ConfigLike = None, force: bool = False) -> api.Params:
  """Converts ``checkpoint_path`` (.pth) into the checkpoint folder ``out_dir``.

  An existing non-empty ``out_dir`` is refused unless ``force``. The folder is
  written beside ``out_dir`` and renamed into place, then read back and
  compared tensor by tensor.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
    raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or "
                          "pass --force (force=True) to replace it")
  params = weights_from_checkpoint(checkpoint_path, config)
  api.save(params, out_dir, overwrite=force)
  reloaded = api.load(out_dir)
  bad = [jax.tree_util.keystr(path) for path, a, b in _zip_leaves(params.weights, reloaded.weights)
         if not np.array_equal(np.asarray(a), np.asarray(b))]
  if bad or reloaded.config != params.config:
    raise RuntimeError(f"{out_dir} does not read back what was written: {bad or 'config'}")
  return params


def _zip_leaves(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  return [(path, x, y) for (path, x), y in zip(flat_a, flat_b, strict=True)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m minet_jax.convert",
      description="Convert the authors' MI-Net PyTorch checkpoint (e.g. model_ITS.pth) into a "
                  "minet-jax checkpoint folder, without PyTorch.")
  parser.add_argument("checkpoint", help="PyTorch .pth file (legacy or zip format)")
  parser.add_argument("out_dir", help="checkpoint folder to create (must not exist or be empty)")
  parser.add_argument("--force", action="store_true",
                      help="replace out_dir if it already holds files")
  args = parser.parse_args(argv)
  try:
    params = convert(args.checkpoint, args.out_dir, force=args.force)
  except (FileNotFoundError, FileExistsError, torch_pickle.UnsafePickleError,
          torch_pickle.CheckpointFormatError, torch_names.StateDictMismatch) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.checkpoint} -> {args.out_dir}: "
        f"{len(jax.tree.leaves(params.weights))} tensors, {params.num_params():,} parameters, "
        f"input_format={params.config.input_format}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
