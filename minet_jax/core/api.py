"""Dehazing with `Params`: `apply` and `apply_checked`.

``minet_jax.apply(params, img)`` needs nothing but the parameters and the image, and
``jax.jit(minet_jax.apply)`` works (`Params` keeps its config as static metadata).
Under jit the image's values cannot be checked eagerly; `apply_checked` checks them
with `jax.experimental.checkify` instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from minet_jax.core import fixed_point as fp
from minet_jax.core import strips
from minet_jax.core.config import ModelConfig
from minet_jax.core.params import Params, model_from_params

# ------------------------------------------------------------------ apply


# What an integer image is divided by to lie in [0, 1]: its dtype's range.
INTEGER_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


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
  if len(shape) == 2:  # A grayscale image as PIL and imageio read one.
    raise ValueError(f"image must be HxWx3 or NxHxWx3, got shape {shape} (grayscale?); "
                     "convert it with np.repeat(img[..., None], 3, -1) or PIL's "
                     ".convert('RGB')")
  if len(shape) not in (3, 4):
    raise ValueError(f"image must be HxWx3 or NxHxWx3, got shape {shape}")
  channels_first = shape[-3] == 3 if len(shape) == 3 else shape[1] == 3
  if shape[-1] != 3 and channels_first:
    order = "(1, 2, 0)" if len(shape) == 3 else "(0, 2, 3, 1)"
    raise ValueError(f"image has shape {shape}, channels first (CxHxW, as in PyTorch); "
                     f"transpose to HxWx3 with np.transpose(img, {order})")
  if shape[-1] != 3:
    hint = ("convert grayscale with np.repeat(img[..., None], 3, -1) or "
            "PIL's .convert('RGB'); drop alpha with img[..., :3]")
    raise ValueError(f"image must have 3 (RGB) channels in the last axis, got shape "
                     f"{shape}; {hint}")
  if 0 in shape:
    raise ValueError(f"image is empty: shape {shape}")
  if dtype.newbyteorder("=") not in INTEGER_SCALE and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"unsupported image dtype {dtype}; use uint8 (0..255), uint16 (0..65535) "
                    "or float in [0, 1]")
  return dtype


_NON_FINITE = "image contains NaN or infinite values"
_RANGE = "float images must lie in [0, 1], got values in [{lo}, {hi}]; divide 0..255 data by 255"


def _for_jax(img: Any) -> Any:
  """A numpy image JAX takes as it is: native byte order (not big-endian data), and floats
  of at most 64 bits (not ``np.longdouble``)."""
  if isinstance(img, np.ndarray):
    if img.dtype.kind == "f" and img.dtype.itemsize > 8:
      return img.astype(np.float64)
    if not img.dtype.isnative:
      return img.astype(img.dtype.newbyteorder("="))
  return img


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
  x = jnp.asarray(_for_jax(img))
  scale = INTEGER_SCALE.get(np.dtype(x.dtype))
  x = x.astype(jnp.float32) / scale if scale else x.astype(jnp.float32)
  return x[None] if x.ndim == 3 else x


def apply(params: Params, img: Any, *, strip_rows: int | None = None,
          progress: strips.Progress | None = None,
          solves: list[fp.SolveSummary] | None = None) -> jax.Array:
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
  strips (`minet_jax.core.strips`): the same result up to float32 rounding, in a fraction
  of the memory. ``strip_rows`` overrides the choice: 0 for the whole image at once,
  n > 0 for strips of n rows.

  ``progress(done, total)``, when given, is called after each compiled stage of the
  strip-wise forward has finished (``total`` is the number of stages), or once at the
  end of a whole-image forward: what a progress bar needs. It waits for each stage,
  which costs nothing since every stage needs the previous one's result.

  ``solves``, when a list, receives one `fixed_point.SolveSummary` per IM-block
  (status, steps and final residual, each with a batch axis; a two-stage block's
  per stage too): how the blocks were solved for this image (`describe_solves` puts
  it in words). For eager calls: under ``jax.jit`` the list would receive tracers;
  jit `dehaze_batch_with_solves` instead, which returns them.
  """
  if not isinstance(params, Params):
    raise TypeError(f"params must be minet_jax.Params (from init/load), got "
                    f"{type(params).__name__}")
  x = to_float_rgb(img)
  rows = strips.choose_strip_rows(x.shape[1], x.shape[2], strip_rows)
  if rows:
    out = _clip(strips.forward(model_from_params(params), x, rows, progress=progress,
                               solves=solves))
  else:
    if solves is not None:
      out, summaries = _forward_with_solves(params, x)
      solves.extend(summaries)
    else:
      out = _forward(params, x)
    if progress is not None:
      out = jax.block_until_ready(out)
      progress(1, 1)
  return out[0] if len(img.shape) == 3 else out


def _value_checks(x: jax.Array) -> None:
  """The value checks of a float image as checkify checks."""
  checkify.check(jnp.all(jnp.isfinite(x)), _NON_FINITE)
  lo, hi = jnp.min(x), jnp.max(x)
  checkify.check((lo >= -1e-3) & (hi <= 1.0 + 1e-3), _RANGE, lo=lo, hi=hi)


def _apply_with_value_checks(params: Params, img: Any) -> jax.Array:
  dtype = _check_layout(img)
  if jnp.issubdtype(dtype, jnp.floating):
    _value_checks(jnp.asarray(img, jnp.float32))
  return apply(params, img)


# Traced (inside the caller's jit): the checks compile into the caller's program.
_apply_checked = checkify.checkify(_apply_with_value_checks)
# Concrete: the checks as a program of their own, compiled once per image shape; the
# forward is then `apply`'s, compiled once too (checkify alone traced it on every call).
_checked_values = jax.jit(checkify.checkify(_value_checks))


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
  img = _for_jax(img)
  if not _is_concrete(img):
    return _apply_checked(params, img)
  dtype = _check_layout(img)
  if not jnp.issubdtype(dtype, jnp.floating):
    return _checked_values(jnp.zeros((1,), jnp.float32))[0], apply(params, img)
  error, _ = _checked_values(jnp.asarray(img, jnp.float32))
  if error.get() is not None:  # `apply` would raise; the output is not meaningful.
    return error, jnp.full(img.shape, jnp.nan, jnp.float32)
  return error, apply(params, img)


def dehaze_batch(params: Params, x: jax.Array) -> jax.Array:
  """float32 NHWC RGB in [0, 1] -> dehazed, clipped to [0, 1]; no checks, traceable.

  The model step every evaluator shares (`apply` checks its input first).
  """
  return jnp.clip(model_from_params(params)(x), 0.0, 1.0).astype(jnp.float32)


# Compiled once per (architecture, image shape); nested inside a caller's jit it inlines.
_forward = jax.jit(dehaze_batch)


def dehaze_batch_with_solves(params: Params, x: jax.Array
                             ) -> tuple[jax.Array, list[fp.SolveSummary]]:
  """`dehaze_batch`, plus one `fixed_point.SolveSummary` per IM-block (batch axis first):
  how each image had its blocks solved. Traceable; the same computation as
  `dehaze_batch`, whose compiled code drops the summaries."""
  y, _, runs = model_from_params(params).forward_runs(x)
  return _clip(y), [run.summary for run in runs]


_forward_with_solves = jax.jit(dehaze_batch_with_solves)


def describe_solves(solves: list[fp.SolveSummary], cfg: ModelConfig, index: int = 0) -> str:
  """One line on how image `index` of a batch had its IM-blocks solved, e.g.
  ``"picard to rtol 0.001: 4 / 6 / 9 steps, all converged (residuals <= 8.2e-04)"``;
  a two-stage block's steps are each stage's (``4 / 8+6 / 9``), and a miss names its
  stage and that stage's status (``block 2 stage 1 max_steps_reached``)."""
  image = [s.at(index) for s in solves]
  stages = [s.stages_at(index) for s in solves]
  steps = " / ".join("+".join(str(n) for n, _ in block) for block in stages)
  if not fp.stops_at_tolerance(cfg.solver):
    return f"{cfg.solver}: {steps} steps per IM-block"

  def missed(block: int, stage: tuple[tuple[int, fp.RESULTS], ...]) -> str:
    if len(stage) == 1:
      return f"block {block} {stage[0][1].name}"
    return f"block {block} " + ", ".join(
        f"stage {i} {status.name}" for i, (_, status) in enumerate(stage, 1)
        if status != fp.RESULTS.successful)

  verdict = (f"all converged (residuals <= {max(r for _, _, r in image):.1e})"
             if all(st == fp.RESULTS.successful for _, st, _ in image) else
             "; ".join(f"{missed(b, stage)} (residual {r:.1e})"
                       for b, ((_, st, r), stage) in enumerate(zip(image, stages), 1)
                       if st != fp.RESULTS.successful))
  tolerance = f"rtol {cfg.rtol:g}" + (f", atol {cfg.atol:g}" if cfg.atol else "")
  return f"{cfg.solver} to {tolerance}: {steps} steps, {verdict}"


# `strips.forward` is not jitted as a whole: called eagerly, it runs compiled stages one
# after the other, each with only its own scratch memory; only the final clip is jitted.
@jax.jit
def _clip(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 1.0).astype(jnp.float32)
