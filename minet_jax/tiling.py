"""Running an image-to-image function over overlapping tiles and blending the seams.

For images too large to process at once. Tiles are ``tile x tile`` (smaller
only where the image is), spaced so neighbours overlap by at least
``overlap`` pixels, and all of one shape, so a jitted model compiles once.
Each tile's output is weighted by a window that ramps from ~0 to 1 across the
overlap on sides shared with a neighbour ("linear" or raised-"cosine") and is
flat at the image border; the weighted outputs are summed and divided by the
summed weights.

MI-Net normalises features per instance (per tile here), so tiles see
different statistics than the whole image: tiling is an approximation whose
cost ``benchmarks/tiling_cost.py`` measures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from minet_jax.core.config import is_count

BLENDS = ("linear", "cosine")
# What `tiled_apply` holds per pixel of the whole image beyond its input: float64 sums
# of the weighted outputs (24 B) and of the weights (8 B), their quotient (24 B) and
# its float32 copy (12 B). A tile's own work is bounded by the tile, not the image.
BYTES_PER_PIXEL = 68.0
# progress(done, total): called as tiles (or a model's stages) finish.
Progress = Callable[[int, int], None]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets along one axis: first at 0, last at ``size - tile``, evenly spread."""
  if tile >= size:
    return [0]
  stride = tile - overlap
  if stride < 1:
    raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
  count = -(-(size - tile) // stride) + 1  # ceil: enough tiles for gaps <= stride
  return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, overlap: int, rise: bool, fall: bool, blend: str) -> np.ndarray:
  w = np.ones(length, np.float64)
  n = min(overlap, length)
  if n <= 0:
    return w
  x = (np.arange(n) + 0.5) / n  # strictly inside (0, 1): no zero weights
  r = x if blend == "linear" else 0.5 - 0.5 * np.cos(np.pi * x)
  if rise:
    w[:n] = np.minimum(w[:n], r)
  if fall:
    w[length - n:] = np.minimum(w[length - n:], r[::-1])
  return w


def _check_blend(blend: str) -> None:
  if blend not in BLENDS:
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")


def blend_window(h: int, w: int, *, top: bool, bottom: bool, left: bool, right: bool,
                 overlap: int, blend: str = "cosine") -> np.ndarray:
  """(h, w) weights; a side ramps only when a neighbouring tile shares it."""
  _check_blend(blend)
  return np.outer(_ramp(h, overlap, top, bottom, blend), _ramp(w, overlap, left, right, blend))


def tiled_apply(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, tile: int,
                overlap: int = 32, blend: str = "cosine",
                progress: Progress | None = None) -> np.ndarray:
  """Applies ``fn`` ((h, w, C) -> (h, w, C')) tile by tile to ``image`` (H, W, C).

  Returns float32 (H, W, C'). With ``tile`` >= both sides this is ``fn(image)``.
  ``progress(done, total)``, when given, is called after each tile.
  """
  if not (is_count(tile, 1) and is_count(overlap, 0)):
    raise ValueError(f"tile must be an integer >= 1 and overlap an integer >= 0, got "
                     f"tile={tile!r}, overlap={overlap!r}")
  _check_blend(blend)  # Whether or not the image takes more than one tile.
  if np.ndim(image) != 3:
    raise ValueError(f"tiled_apply takes one (H, W, C) image, got shape {np.shape(image)}")
  h, w = image.shape[:2]
  th, tw = min(tile, h), min(tile, w)
  ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
  report = progress or (lambda done, total: None)
  if len(ys) == 1 and len(xs) == 1:
    out = np.asarray(fn(image), np.float32)
    report(1, 1)
    return out
  acc = None
  weight = np.zeros((h, w, 1), np.float64)
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      out = np.asarray(fn(image[y:y + th, x:x + tw]), np.float64)
      win = blend_window(th, tw, top=i > 0, bottom=i < len(ys) - 1, left=j > 0,
                         right=j < len(xs) - 1, overlap=overlap, blend=blend)[..., None]
      if acc is None:
        acc = np.zeros((h, w, out.shape[-1]), np.float64)
      acc[y:y + th, x:x + tw] += win * out
      weight[y:y + th, x:x + tw] += win
      report(i * len(xs) + j + 1, len(ys) * len(xs))
  return (acc / weight).astype(np.float32)
