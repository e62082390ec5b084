"""Dark channel prior dehazing (He, Sun and Tang, CVPR 2009 / TPAMI 2011).

The classical baseline reported next to learned dehazers. With the haze model
``I = J t + A (1 - t)``:

1. dark channel: per-pixel minimum over RGB, then a ``patch x patch`` minimum;
2. atmospheric light A: among the brightest ``top_fraction`` (0.1%) pixels of
   the dark channel, the input colour of the one with the highest intensity
   (mean of RGB), as in the paper;
3. transmission ``t = 1 - omega * dark(I / A)``;
4. refinement of ``t`` by the guided filter (He, Sun and Tang, ECCV 2010)
   with the grayscale input as guide; the TPAMI guided-filter paper uses
   radius 60 and eps 1e-4 for dehazing (the 2009 paper used soft matting,
   which the guided filter replaced);
5. ``J = (I - A) / max(t, t0) + A``, clipped to [0, 1].

Everything is vectorised JAX (box filters from integral images), jitted per
image shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from minet_jax.core import api


@dataclasses.dataclass(frozen=True)
class DCPConfig:
  """Dark-channel-prior settings; defaults are the papers' values."""
  patch: int = 15  # side of the square minimum filter for the dark channel (odd)
  omega: float = 0.95  # keeps a little haze for depth perception (paper: 0.95)
  t0: float = 0.1  # lower bound on the transmission in the recovery step
  top_fraction: float = 0.001  # share of brightest dark-channel pixels searched for A
  refine: bool = True  # guided-filter refinement of the transmission
  guided_radius: int = 60  # guided filter box radius r (window 2r+1)
  guided_eps: float = 1e-4  # guided filter regulariser on the [0, 1] gray guide


def dark_channel(image: jax.Array, patch: int = 15) -> jax.Array:
  """min over RGB then over a ``patch x patch`` window (clipped at the borders)."""
  if patch < 1 or patch % 2 == 0:
    raise ValueError(f"patch must be a positive odd size, got {patch}")
  m = jnp.min(image, axis=-1)
  pad = patch // 2
  return jax.lax.reduce_window(m, jnp.inf, jax.lax.min, (patch, patch), (1, 1),
                               ((pad, pad), (pad, pad)))


def _box_mean_axis(x, r: int, axis: int):
  """Mean over [i-r, i+r] along ``axis``, windows clipped to the image."""
  n = x.shape[axis]
  x = jnp.moveaxis(x, axis, 0)
  c = jnp.concatenate([jnp.zeros_like(x[:1]), jnp.cumsum(x, axis=0)], axis=0)
  i = jnp.arange(n)
  hi, lo = jnp.minimum(i + r + 1, n), jnp.maximum(i - r, 0)
  count = (hi - lo).astype(x.dtype).reshape((n,) + (1,) * (x.ndim - 1))
  return jnp.moveaxis((c[hi] - c[lo]) / count, 0, axis)


@functools.partial(jax.jit, static_argnames=("r",))
def box_mean(x: jax.Array, r: int) -> jax.Array:
  """Mean of x (H, W, ...) over (2r+1)^2 windows clipped at the borders."""
  return _box_mean_axis(_box_mean_axis(x, r, 0), r, 1)


@functools.partial(jax.jit, static_argnames=("radius", "eps"))
def guided_filter(guide: jax.Array, src: jax.Array, radius: int = 60, eps: float = 1e-4
                  ) -> jax.Array:
  """He et al.'s guided filter with a gray guide (H, W) and source (H, W)."""
  # Centring keeps the float32 variance mean(I^2) - mean(I)^2 accurate.
  g = guide - jnp.mean(guide)
  mean_g, mean_p = box_mean(g, radius), box_mean(src, radius)
  var_g = box_mean(g * g, radius) - mean_g * mean_g
  cov_gp = box_mean(g * src, radius) - mean_g * mean_p
  a = cov_gp / (var_g + eps)
  b = mean_p - a * mean_g
  return box_mean(a, radius) * g + box_mean(b, radius)


def atmospheric_light(image: jax.Array, dark: jax.Array, top_fraction: float = 0.001
                      ) -> jax.Array:
  """A: the brightest input pixel among the top ``top_fraction`` of the dark channel."""
  flat_dark = dark.reshape(-1)
  k = max(1, int(flat_dark.shape[0] * top_fraction))
  _, idx = jax.lax.top_k(flat_dark, k)
  candidates = image.reshape(-1, 3)[idx]
  return candidates[jnp.argmax(jnp.mean(candidates, axis=-1))]


@functools.partial(jax.jit, static_argnames=("config",))
def _dehaze(image, config: DCPConfig):
  dark = dark_channel(image, config.patch)
  a = atmospheric_light(image, dark, config.top_fraction)
  a = jnp.maximum(a, 1e-3)  # a black "sky" would divide by zero
  t = 1.0 - config.omega * dark_channel(image / a, config.patch)
  if config.refine:
    # A weighted sum, not a matmul: on a GPU a default-precision matmul runs in TF32.
    gray = jnp.sum(image * jnp.array([0.299, 0.587, 0.114], image.dtype), axis=-1)
    t = guided_filter(gray, t, config.guided_radius, config.guided_eps)
  t = jnp.maximum(t, config.t0)[..., None]
  return jnp.clip((image - a) / t + a, 0.0, 1.0), t[..., 0], a


def dehaze(image: ArrayLike, config: DCPConfig | None = None, **overrides: Any) -> jax.Array:
  """Dehazes an RGB image (H, W, 3): floats in [0, 1], or uint8 / uint16 scaled by their
  range; returns float32 RGB in [0, 1]. Bad input is refused as `minet_jax.apply` refuses it.

  ``overrides`` replace fields of ``config`` (e.g. ``refine=False``). Traceable: a
  caller may jit it, or compile it ahead of time per image shape (`minet_jax.evaluation`).
  """
  return dehaze_with_maps(image, config, **overrides)[0]


def _one_image(image: ArrayLike) -> jax.Array:
  """``image`` as float32 (H, W, 3) in [0, 1], checked as `minet_jax.apply` checks its
  input (uint8 and uint16 scaled by their range; NaN and 0..255 floats refused)."""
  x = api.to_float_rgb(image)
  if jnp.ndim(image) != 3:
    raise ValueError(f"the dark channel prior takes one (H, W, 3) image, got shape "
                     f"{tuple(jnp.shape(image))}; call it once per image")
  return x[0]


def dehaze_with_maps(image: ArrayLike, config: DCPConfig | None = None,
                     **overrides: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Like `dehaze`, also returning the transmission map (H, W) and A (3,)."""
  config = dataclasses.replace(config or DCPConfig(), **overrides)
  return _dehaze(_one_image(image), config)
