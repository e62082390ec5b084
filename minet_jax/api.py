"""The functional API: `init`, `apply`, `save`, `load`.

`Params` carries the weights and the architecture they belong to, so
``minet_jax.apply(params, img)`` needs nothing else and ``jax.jit(minet_jax.apply)``
works: the config is static pytree metadata, the weights are the leaves.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from minet_jax import strips
from minet_jax.config import ConfigLike, ModelConfig, model_config
from minet_jax.model import MINet

CONFIG_FILE = "minet_config.json"
WEIGHTS_DIR = "weights"
FORMAT_VERSION = 1


@struct.dataclass
class Params:
  """MI-Net weights (nested dict of arrays, string keys) and their `ModelConfig`."""
  weights: dict
  config: ModelConfig = struct.field(pytree_node=False)

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.weights))


class CheckpointError(OSError):
  """A checkpoint folder is missing, incomplete or unreadable."""


# ------------------------------------------------------------------ model <-> params


def stringify_keys(tree: Any) -> Any:
  """Nested dict with every key a string (orbax and JSON need them; nnx lists use ints)."""
  if isinstance(tree, Mapping):
    return {str(k): stringify_keys(v) for k, v in tree.items()}
  return tree


def restore_key_types(tree: Any, like: Any) -> Any:
  """Restores the key types of `like` (nnx uses ints for list indices)."""
  if isinstance(like, Mapping):
    return {k: restore_key_types(tree[str(k)], v) for k, v in like.items()}
  return tree


@functools.lru_cache(maxsize=16)
def _skeleton(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, dict]:
  """Graph definition, abstract state and its pure-dict shape, built without FLOPs."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MINet(cfg, rngs=nnx.Rngs(0))))
  return graphdef, state, nnx.to_pure_dict(state)


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of every parameter of the architecture `cfg`."""
  return _flat_shapes(stringify_keys(_skeleton(cfg)[2]))


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def params_from_model(model: MINet) -> Params:
  """Snapshot of an NNX model's parameters as `Params`."""
  weights = stringify_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return Params(weights=weights, config=model.config)


def model_from_params(params: Params) -> MINet:
  """An NNX model holding `params` (no copy of the arrays)."""
  graphdef, abstract, pure = _skeleton(params.config)
  state = jax.tree.map(lambda leaf: leaf, abstract)  # A fresh State; the cached one stays abstract.
  nnx.replace_by_pure_dict(state, restore_key_types(params.weights, pure))
  return nnx.merge(graphdef, state)


def init(config: ConfigLike = None, *, seed: int = 0) -> Params:
  """Freshly initialised MI-Net parameters (the authors' initialisation).

  Args:
    config: None for the released architecture, a `ModelConfig`, or a (Config)dict
      (a full training config with a ``model`` section, or that section).
    seed: PRNG seed.
  """
  cfg = model_config(config)
  # The non-partitionable threefry compiles several times faster on XLA:CPU, which
  # dominates the cost of drawing ~100 small parameter tensors eagerly.
  with jax.threefry_partitionable(False):
    return params_from_model(MINet(cfg, rngs=nnx.Rngs(seed)))


# ------------------------------------------------------------------ apply


_INTEGER_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_image(img: Any) -> None:
  """Raises ValueError/TypeError with the fix when `img` is not a valid image batch."""
  if not hasattr(img, "shape") or not hasattr(img, "dtype"):
    raise TypeError(f"image must be a numpy or jax array, got {type(img).__name__}; "
                    "wrap it with np.asarray(...)")
  if img.ndim not in (3, 4):
    raise ValueError(f"image must be HxWx3 or NxHxWx3, got shape {tuple(img.shape)}")
  if img.shape[-1] != 3:
    hint = ("convert grayscale with np.repeat(img[..., None], 3, -1) or "
            "PIL's .convert('RGB'); drop alpha with img[..., :3]")
    raise ValueError(f"image must have 3 (RGB) channels in the last axis, got shape "
                     f"{tuple(img.shape)}; {hint}")
  if 0 in img.shape:
    raise ValueError(f"image is empty: shape {tuple(img.shape)}")
  dtype = np.dtype(img.dtype)
  if dtype not in _INTEGER_SCALE and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"unsupported image dtype {dtype}; use uint8 (0..255), uint16 (0..65535) "
                    "or float in [0, 1]")
  if jnp.issubdtype(dtype, jnp.floating) and _is_concrete(img):
    values = np.asarray(img, dtype=np.float32)
    if not np.all(np.isfinite(values)):
      raise ValueError("image contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
      raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                       "divide 0..255 data by 255")


def to_float_rgb(img: Any) -> jax.Array:
  """Validated image -> float32 NHWC in [0, 1] (integer types scaled by their range)."""
  validate_image(img)
  x = jnp.asarray(img)
  scale = _INTEGER_SCALE.get(np.dtype(x.dtype))
  x = x.astype(jnp.float32) / scale if scale else x.astype(jnp.float32)
  return x[None] if x.ndim == 3 else x


def apply(params: Params, img: Any, *, strip_rows: int | None = None) -> jax.Array:
  """Dehazes `img` (HxWx3 or NxHxWx3, RGB, uint8/uint16 or float in [0, 1]).

  Returns float32 RGB in [0, 1] with the input's layout. Any height and width work:
  odd sizes are padded for the stride-2 encoder and cropped back.

  Images above `strips.AUTO_PIXELS` (2 MP) run their full-resolution layers in row
  strips (`minet_jax.strips`): the same result up to float32 rounding, in a fraction
  of the memory. ``strip_rows`` overrides the choice: 0 for the whole image at once,
  n > 0 for strips of n rows.
  """
  if not isinstance(params, Params):
    raise TypeError(f"params must be minet_jax.Params (from init/load), got "
                    f"{type(params).__name__}")
  x = to_float_rgb(img)
  rows = strips.choose_strip_rows(x.shape[1], x.shape[2], strip_rows)
  out = _forward_strips(params, x, rows) if rows else _forward(params, x)
  return out[0] if img.ndim == 3 else out


@jax.jit
def _forward(params: Params, x: jax.Array) -> jax.Array:
  # Compiled once per (architecture, image shape); nested inside a caller's jit it inlines.
  return jnp.clip(model_from_params(params)(x), 0.0, 1.0).astype(jnp.float32)


def _forward_strips(params: Params, x: jax.Array, rows: int) -> jax.Array:
  # Not jitted as a whole: called eagerly, `strips.forward` runs compiled stages one
  # after the other, each with only its own scratch memory.
  return _clip(strips.forward(model_from_params(params), x, rows))


@jax.jit
def _clip(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 1.0).astype(jnp.float32)


# ------------------------------------------------------------------ save / load


def save(params: Params, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` to the folder `path` (orbax weights + JSON config).

  The folder is written beside its destination and renamed into place, so an
  interrupted save leaves nothing half-written. An existing non-empty folder is
  refused unless ``overwrite=True``.
  """
  import orbax.checkpoint as ocp  # Deferred: orbax's import is slow and apply() needs none of it.

  path = pathlib.Path(path).absolute()
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should be an ordinary folder.
  try:
    weights = jax.tree.map(np.asarray, params.weights)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / WEIGHTS_DIR, weights)
    meta = {"format_version": FORMAT_VERSION, "model": params.config.to_dict()}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` stored in a checkpoint folder written by `save`."""
  path = pathlib.Path(path)
  meta_file = path / CONFIG_FILE
  if not path.is_dir():
    raise CheckpointError(f"checkpoint folder {path} does not exist")
  if not meta_file.is_file():
    raise CheckpointError(f"{path} is not a minet-jax checkpoint: {CONFIG_FILE} is missing "
                          "(convert an authors' .pth with `python -m minet_jax.convert`)")
  try:
    meta = json.loads(meta_file.read_text())
    return model_config(meta["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_file} is corrupt: {e}") from e


def _weights_dir(path: pathlib.Path) -> pathlib.Path:
  """``path/weights``, or in a training workdir its best (else latest) checkpoint's weights."""
  if not (path / WEIGHTS_DIR).exists():
    from minet_jax.train import checkpointing  # Deferred: only training workdirs need it.
    found = checkpointing.find_params(path)
    if found is not None:
      return found
  return path / WEIGHTS_DIR


def load(path: str | os.PathLike) -> Params:
  """Reads a checkpoint folder written by `save` (or by the converter), or a training
  workdir (``train.py --workdir``: its best-validation, else latest, weights)."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(path).absolute()
  cfg = load_config(path)
  weights_dir = _weights_dir(path)
  _, _, pure = _skeleton(cfg)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), stringify_keys(pure))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      weights = ckptr.restore(weights_dir, target)
  except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, ...).
    raise CheckpointError(f"could not read the weights in {weights_dir}: "
                          f"{type(e).__name__}: {e}") from e
  # orbax restores what is on disk even when it disagrees with the target; check it here.
  expected, got = param_shapes(cfg), _flat_shapes(weights)
  if got != expected:
    wrong = sorted(".".join(k) for k in set(expected) | set(got) if expected.get(k) != got.get(k))
    raise CheckpointError(f"could not read the weights in {weights_dir}: they do not fit "
                          f"the architecture in {CONFIG_FILE} (differing: {', '.join(wrong[:8])}"
                          f"{' ...' if len(wrong) > 8 else ''})")
  return Params(weights=weights, config=cfg)
