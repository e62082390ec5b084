"""PSNR and SSIM in JAX, following the dehazing evaluation protocol.

The protocol (the one the authors' published SOTS scores use):

* both images RGB on a 0..255 scale (``data_range=255``);
* the model output clipped to [0, 255] (as floats, not rounded);
* a ground truth larger than the output centre-cropped to the output's size
  (SOTS ground truths come 640x480 beside 620x460 hazy images);
* SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
  K2 = 0.03, population covariance, averaged over valid window positions
  and then over the three channels -- the same numbers as
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=2, data_range=255)``.

All functions accept a single ``(H, W, C)`` image or a batch ``(..., H, W, C)``
and return one score per image; `psnr` and `ssim` take two images of one shape.
Images on a 0..1 scale (what `minet_jax.apply` and `read_rgb` return) need
``data_range=1.0``: with the default 255, two concrete float images whose values all
lie in [0, 2] (an unclipped output overshoots 1) are refused, since they would score
about 48 dB too high.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from minet_jax.image_io import centre_crop

DATA_RANGE = 255.0


def match_ground_truth(output: jax.Array, gt: jax.Array) -> jax.Array:
  """Centre-crops ``gt`` to ``output``'s size when it is larger (SOTS 640x480 GT)."""
  if output.shape[-1] != gt.shape[-1]:
    raise ValueError(f"channel count differs: output {output.shape}, ground truth {gt.shape}")
  return centre_crop(gt, output.shape[-3], output.shape[-2])


def _check_shapes(name: str, output: ArrayLike, target: ArrayLike) -> None:
  """Refuses images of two shapes: no broadcasting (scikit-image refuses them too)."""
  shapes = jnp.shape(output), jnp.shape(target)
  if shapes[0] != shapes[1] or len(shapes[0]) < 3:
    raise ValueError(f"{name} compares two images (H, W, C) or batches of one shape, got "
                     f"output {shapes[0]} and target {shapes[1]}")


# A float image whose peak is at most this, scored on the 0..255 scale, is 0..1 data: a
# model's unclipped output overshoots 1 a little, and a 0..255 image this dark is black.
_UNIT_SCALE_PEAK = 2.0


def _check_scale(name: str, output: ArrayLike, target: ArrayLike, data_range: float) -> None:
  """Outside a trace, refuses two float images that both look like 0..1 data (peaks in
  (0, `_UNIT_SCALE_PEAK`]) scored with a data_range above that (module docstring); an
  integer image is on its own scale, however dark."""
  if data_range <= _UNIT_SCALE_PEAK:
    return
  peaks = []
  for image in (output, target):
    if isinstance(image, jax.core.Tracer):
      return
    image = image if hasattr(image, "dtype") else np.asarray(image)  # Lists, scalars.
    if not jnp.issubdtype(image.dtype, jnp.floating):
      return
    peaks.append(float(np.nanmax(np.asarray(image, np.float32))) if np.size(image) else 0.0)
  if all(peak <= _UNIT_SCALE_PEAK for peak in peaks) and max(peaks) > 0.0:
    raise ValueError(f"{name}: both images look like 0..1 data (peaks {peaks[0]:.3g} and "
                     f"{peaks[1]:.3g}) but are scored with data_range={data_range:g}; pass "
                     "data_range=1.0, or scale them to 0..255")


def _check_pair(name: str, output: ArrayLike, target: ArrayLike, data_range: float) -> None:
  _check_shapes(name, output, target)
  _check_scale(name, output, target, data_range)


def psnr(output: ArrayLike, target: ArrayLike, data_range: float = DATA_RANGE) -> jax.Array:
  """Peak signal-to-noise ratio in dB over the last three axes (no clipping here)."""
  _check_pair("psnr", output, target, data_range)
  return _psnr(output, target, data_range=data_range)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(output, target, data_range: float):
  x = jnp.asarray(output, jnp.float32)
  y = jnp.asarray(target, jnp.float32)
  mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float, truncate: float = 3.5) -> np.ndarray:
  # Same taps as scipy.ndimage.gaussian_filter (radius int(truncate*sigma+0.5)).
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / sigma)**2)
  return (taps / taps.sum()).astype(np.float32)


def _blur_valid(x, taps):
  """Separable Gaussian over axes 1, 2 of (N, H, W, C), 'valid' positions only."""
  # Shifted-slice sums: on CPU this beats XLA's depthwise convolution by ~2x.
  k = taps.shape[0]
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(float(taps[i]) * x[:, i:i + h] for i in range(k))
  return sum(float(taps[i]) * rows[:, :, i:i + w] for i in range(k))


def ssim(output: ArrayLike, target: ArrayLike, data_range: float = DATA_RANGE,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Mean SSIM over valid 11x11 windows and channels (population covariance).

  Only window positions that lie wholly inside the image are averaged, which is
  what skimage's ``structural_similarity`` does after cropping its border, so
  no padding convention is involved.
  """
  _check_pair("ssim", output, target, data_range)
  return _ssim(output, target, data_range=data_range, sigma=sigma, k1=k1, k2=k2)


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "k1", "k2"))
def _ssim(output, target, data_range: float, sigma: float, k1: float, k2: float):
  x = jnp.asarray(output, jnp.float32) / data_range
  y = jnp.asarray(target, jnp.float32) / data_range
  batch = x.shape[:-3]
  x = x.reshape((-1,) + x.shape[-3:])
  y = y.reshape((-1,) + y.shape[-3:])
  taps = _gaussian_taps(sigma)
  if min(x.shape[1:3]) < taps.shape[0]:
    raise ValueError(f"SSIM needs images of at least {taps.shape[0]}x{taps.shape[0]}, "
                     f"got {x.shape[1]}x{x.shape[2]}")
  # Variances are shift invariant; removing each channel's mean first keeps the
  # float32 differences E[x^2] - E[x]^2 from cancelling catastrophically.
  cx = jnp.mean(x, axis=(1, 2), keepdims=True)
  cy = jnp.mean(y, axis=(1, 2), keepdims=True)
  xs, ys = x - cx, y - cy
  mx, my, mxx, myy, mxy = jnp.split(
      _blur_valid(jnp.concatenate([xs, ys, xs * xs, ys * ys, xs * ys], -1), taps), 5, -1)
  vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
  ux, uy = mx + cx, my + cy
  c1, c2 = k1**2, k2**2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3)).reshape(batch)


def protocol_scores(output: ArrayLike, gt: ArrayLike, data_range: float = DATA_RANGE
                    ) -> tuple[jax.Array, jax.Array]:
  """Per-image (PSNR, SSIM) of outputs against ground truths under the protocol above.

  ``output`` is an unclipped image or batch on the ``data_range`` scale; ``gt``
  may be larger and is centre-cropped.
  """
  _check_scale("protocol_scores", output, gt, data_range)  # On the caller's own dtypes.
  output = jnp.clip(jnp.asarray(output, jnp.float32), 0.0, data_range)
  gt = match_ground_truth(output, jnp.asarray(gt, jnp.float32))
  _check_shapes("protocol_scores", output, gt)
  return (_psnr(output, gt, data_range=data_range),
          _ssim(output, gt, data_range=data_range, sigma=1.5, k1=0.01, k2=0.03))


def dehazing_scores(output: ArrayLike, gt: ArrayLike, data_range: float = DATA_RANGE
                    ) -> tuple[float, float]:
  """`protocol_scores` of one image, as Python floats."""
  p, s = protocol_scores(output, gt, data_range)
  return float(p), float(s)
