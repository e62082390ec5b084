"""The functional API: `init`, `apply`, `save`, `load`.

`Params` carries the weights and the architecture they belong to, so
``minet_jax.apply(params, img)`` needs nothing else and ``jax.jit(minet_jax.apply)``
works: the config is static pytree metadata, the weights are the leaves. Under
jit the image's values cannot be checked eagerly; `apply_checked` checks them
with `jax.experimental.checkify` instead.

A saved folder records a SHA-256 of its weights in ``minet_config.json``; `load`
verifies it, refuses non-finite weights (naming the tensor) and refuses folders
written by a newer ``format_version`` than this code reads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import checkify

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


def _check_layout(img: Any) -> np.dtype:
  """The checks that need no values (work on tracers too); returns the numpy dtype."""
  if not hasattr(img, "shape") or not hasattr(img, "dtype"):
    raise TypeError(f"image must be a numpy or jax array, got {type(img).__name__}; "
                    "wrap it with np.asarray(...)")
  try:
    dtype = np.dtype(img.dtype)
  except TypeError:
    raise TypeError(f"image dtype {img.dtype!r} is not a numpy dtype; pass a numpy or jax "
                    "array (np.asarray(...))") from None
  shape = tuple(img.shape)
  if len(shape) not in (3, 4):
    raise ValueError(f"image must be HxWx3 or NxHxWx3, got shape {shape}")
  if shape[-1] != 3:
    hint = ("convert grayscale with np.repeat(img[..., None], 3, -1) or "
            "PIL's .convert('RGB'); drop alpha with img[..., :3]")
    raise ValueError(f"image must have 3 (RGB) channels in the last axis, got shape "
                     f"{shape}; {hint}")
  if 0 in shape:
    raise ValueError(f"image is empty: shape {shape}")
  if dtype not in _INTEGER_SCALE and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"unsupported image dtype {dtype}; use uint8 (0..255), uint16 (0..65535) "
                    "or float in [0, 1]")
  return dtype


_NON_FINITE = "image contains NaN or infinite values"
_RANGE = "float images must lie in [0, 1], got values in [{lo}, {hi}]; divide 0..255 data by 255"


def validate_image(img: Any) -> None:
  """Raises ValueError/TypeError with the fix when `img` is not a valid image batch.

  Shape, channel and dtype checks always run. The value checks (NaN/Inf, floats
  outside [0, 1]) run only on concrete arrays: a traced image (inside jit, vmap,
  grad) has no values yet -- see `apply_checked` for checking those.
  """
  dtype = _check_layout(img)
  if jnp.issubdtype(dtype, jnp.floating) and _is_concrete(img):
    values = np.asarray(img, dtype=np.float32)
    if not np.all(np.isfinite(values)):
      raise ValueError(_NON_FINITE)
    lo, hi = float(values.min()), float(values.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
      raise ValueError(_RANGE.format(lo=f"{lo:.4g}", hi=f"{hi:.4g}"))


def to_float_rgb(img: Any) -> jax.Array:
  """Validated image -> float32 NHWC in [0, 1] (integer types scaled by their range)."""
  validate_image(img)
  if isinstance(img, np.ndarray) and not img.dtype.isnative:
    img = img.astype(img.dtype.newbyteorder("="))  # e.g. big-endian data; JAX takes native only
  x = jnp.asarray(img)
  scale = _INTEGER_SCALE.get(np.dtype(x.dtype))
  x = x.astype(jnp.float32) / scale if scale else x.astype(jnp.float32)
  return x[None] if x.ndim == 3 else x


def apply(params: Params, img: Any, *, strip_rows: int | None = None) -> jax.Array:
  """Dehazes `img` (HxWx3 or NxHxWx3, RGB, uint8/uint16 or float in [0, 1]).

  Returns float32 RGB in [0, 1] with the input's layout. Any height and width work:
  odd sizes are padded for the stride-2 encoder and cropped back.

  Bad input raises ValueError/TypeError naming the problem. Under
  ``jax.jit(minet_jax.apply)`` (or vmap, grad) the image is a tracer without
  values: shape, channel and dtype errors still raise, but the value checks
  cannot run, so a float image holding NaN or Inf silently gives NaN outputs
  and one on the 0..255 scale silently gives a clipped, wrong image. When you
  jit it yourself, use `apply_checked`, which makes those checks part of the
  compiled function::

      err, out = jax.jit(minet_jax.apply_checked)(params, img)
      err.throw()  # ValueError naming the problem, if there was one

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
  return out[0] if len(img.shape) == 3 else out


def _apply_with_value_checks(params: Params, img: Any) -> jax.Array:
  dtype = _check_layout(img)
  if jnp.issubdtype(dtype, jnp.floating):
    x = jnp.asarray(img, jnp.float32)
    checkify.check(jnp.all(jnp.isfinite(x)), _NON_FINITE)
    lo, hi = jnp.min(x), jnp.max(x)
    checkify.check((lo >= -1e-3) & (hi <= 1.0 + 1e-3), _RANGE, lo=lo, hi=hi)
  return apply(params, img)


_apply_checked = checkify.checkify(_apply_with_value_checks)


def apply_checked(params: Params, img: Any) -> tuple[checkify.Error, jax.Array]:
  """`apply` whose value checks also work under ``jax.jit``: returns ``(error, output)``.

  The NaN/Inf and [0, 1] checks of float images are `jax.experimental.checkify`
  checks, so they run inside the compiled function, traced or not. Shape,
  channel and dtype errors raise at once, as in `apply`. ``error.throw()``
  raises a `ValueError` (checkify's ``JaxRuntimeError``) naming the problem and
  does nothing when the image was fine; ``error.get()`` gives the message or
  None. The output of a failed check is not meaningful.

      err, out = jax.jit(minet_jax.apply_checked)(params, img)
      err.throw()
  """
  if not isinstance(params, Params):
    raise TypeError(f"params must be minet_jax.Params (from init/load), got "
                    f"{type(params).__name__}")
  if isinstance(img, np.ndarray) and not img.dtype.isnative:
    img = img.astype(img.dtype.newbyteorder("="))
  return _apply_checked(params, img)


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


def _flat_named(tree: Any) -> list[tuple[str, Any]]:
  """(dotted path, leaf) pairs of a weights tree, sorted by path."""
  flat = jax.tree_util.tree_flatten_with_path(stringify_keys(tree))[0]
  return sorted((".".join(str(k.key) for k in path), leaf) for path, leaf in flat)


def weights_checksum(weights: Any) -> str:
  """SHA-256 of every weight's name, shape and float32 little-endian bytes (what `load` returns)."""
  digest = hashlib.sha256()
  for name, leaf in _flat_named(weights):
    array = np.ascontiguousarray(np.asarray(leaf, dtype="<f4"))
    digest.update(f"{name}:{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _non_finite(name: str, array: np.ndarray) -> str | None:
  bad = int(array.size - np.count_nonzero(np.isfinite(array)))
  return f"{name} holds {bad} NaN or infinite value(s)" if bad else None


def _weights_to_save(weights: Any) -> dict:
  """The weights as float32 numpy arrays; refuses non-float dtypes and non-finite values."""

  def convert(path, leaf):
    name = ".".join(str(k.key) for k in path)
    array = np.asarray(leaf)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
      raise TypeError(f"weight {name} has dtype {array.dtype}; MI-Net weights are floating "
                      "point (refusing to cast)")
    array = array.astype(np.float32)
    problem = _non_finite(name, array)
    if problem:
      raise ValueError(f"refusing to save non-finite weights: {problem}")
    return array

  return jax.tree_util.tree_map_with_path(convert, stringify_keys(weights))


def save(params: Params, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `params` to the folder `path` (orbax weights + JSON config).

  The folder is written beside its destination and renamed into place, so an
  interrupted save leaves nothing half-written. An existing non-empty folder is
  refused unless ``overwrite=True``. Weights are stored as float32 with their
  SHA-256 in ``minet_config.json``; non-float (complex, integer) or non-finite
  weights are refused.
  """
  import orbax.checkpoint as ocp  # Deferred: orbax's import is slow and apply() needs none of it.

  path = pathlib.Path(path).absolute()
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
  weights = _weights_to_save(params.weights)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should be an ordinary folder.
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / WEIGHTS_DIR, weights)
    meta = {"format_version": FORMAT_VERSION, "model": params.config.to_dict(),
            "weights_sha256": weights_checksum(weights)}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _read_meta(path: pathlib.Path) -> dict:
  meta_file = path / CONFIG_FILE
  if not path.is_dir():
    raise CheckpointError(f"checkpoint folder {path} does not exist")
  if not meta_file.is_file():
    raise CheckpointError(f"{path} is not a minet-jax checkpoint: {CONFIG_FILE} is missing "
                          "(convert an authors' .pth with `python -m minet_jax.convert`)")
  try:
    meta = json.loads(meta_file.read_text())
    version = meta["format_version"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{meta_file} is corrupt: {type(e).__name__}: {e}") from e
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise CheckpointError(f"{meta_file} is corrupt: format_version {version!r}")
  if version > FORMAT_VERSION:
    raise CheckpointError(f"{meta_file} has format_version {version}, newer than the "
                          f"{FORMAT_VERSION} this minet-jax reads; upgrade minet-jax to load it")
  return meta


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` stored in a checkpoint folder written by `save`."""
  path = pathlib.Path(path)
  meta = _read_meta(path)
  try:
    return model_config(meta["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path / CONFIG_FILE} is corrupt: {e}") from e


def _weights_dir(path: pathlib.Path) -> pathlib.Path:
  """``path/weights``, or in a training workdir its best (else latest) checkpoint's weights."""
  if not (path / WEIGHTS_DIR).exists():
    from minet_jax.train import checkpointing  # Deferred: only training workdirs need it.
    found = checkpointing.find_params(path)
    if found is not None:
      return found
  return path / WEIGHTS_DIR


def one_line_error(e: BaseException) -> str:
  """``Type: message`` on one line; tensorstore's long JSON spec (after the cause) is cut."""
  message = str(e).split(" [tensorstore_spec=")[0].strip()
  first = message.splitlines()[0] if message else ""
  return f"{type(e).__name__}: {first[:300]}"


def _quiet_abandoned_reads() -> None:
  """Silences orbax's stray "Event loop is closed" reports after a failed restore.

  When one read of a damaged checkpoint fails, orbax closes its event loop while
  tensorstore is still finishing the other reads; their completions then report
  ``RuntimeError('Event loop is closed')`` through `sys.unraisablehook`, as
  tracebacks printed long after `load` raised its own error. Exactly those are
  dropped; everything else goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_reports", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop_reports = True
  sys.unraisablehook = hook


def load(path: str | os.PathLike) -> Params:
  """Reads a checkpoint folder written by `save` (or by the converter), or a training
  workdir (``train.py --workdir``: its best-validation, else latest, weights).

  Raises `CheckpointError` when the folder is missing, from a newer format, or its
  weights are unreadable, do not fit the architecture, do not match their recorded
  checksum (damaged files), or are not finite (naming the tensor).
  """
  import orbax.checkpoint as ocp

  path = pathlib.Path(path).absolute()
  meta = _read_meta(path)
  cfg = load_config(path)
  weights_dir = _weights_dir(path)
  _, _, pure = _skeleton(cfg)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), stringify_keys(pure))
  _quiet_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      weights = ckptr.restore(weights_dir, target)
  except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, ...).
    raise CheckpointError(f"could not read the weights in {weights_dir}: "
                          f"{one_line_error(e)}") from e
  # orbax restores what is on disk even when it disagrees with the target; check it here.
  expected, got = param_shapes(cfg), _flat_shapes(weights)
  if got != expected:
    wrong = sorted(".".join(k) for k in set(expected) | set(got) if expected.get(k) != got.get(k))
    raise CheckpointError(f"could not read the weights in {weights_dir}: they do not fit "
                          f"the architecture in {CONFIG_FILE} (differing: {', '.join(wrong[:8])}"
                          f"{' ...' if len(wrong) > 8 else ''})")
  recorded = meta.get("weights_sha256")
  if weights_dir != path / WEIGHTS_DIR:
    from minet_jax.train import checkpointing
    recorded = checkpointing.recorded_checksum(weights_dir)
  if recorded is not None and weights_checksum(weights) != recorded:
    raise CheckpointError(f"the weights in {weights_dir} do not match the checksum recorded "
                          "when they were saved: the files were changed or damaged")
  for name, leaf in _flat_named(weights):
    problem = _non_finite(name, np.asarray(leaf))
    if problem:
      raise CheckpointError(f"the weights in {weights_dir} are not usable: {problem}")
  return Params(weights=weights, config=cfg)
