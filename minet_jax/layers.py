"""Layers with PyTorch's exact semantics, in NHWC.

The released weights were trained in PyTorch, so padding, transposed convolution,
instance-norm statistics and initialisation follow ``torch.nn`` precisely; the
parameter names (``kernel``, ``bias``, ``scale``) are Flax's. Layouts: conv kernels
are HWIO, the transposed conv stores the equivalent forward-conv kernel (HWIO,
spatially flipped), the shared separable kernel is a single ``(k, k)`` array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def kaiming_normal(a: float) -> jax.nn.initializers.Initializer:
  """PyTorch's ``kaiming_normal_(w, a)``: N(0, 2 / ((1 + a^2) fan_in)), fan_in = k*k*in."""
  return jax.nn.initializers.variance_scaling(
      2.0 / (1.0 + a * a), "fan_in", "normal", in_axis=-2, out_axis=-1)


def torch_default_uniform(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch's default bias (and Linear/ConvTranspose weight) init: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


class Conv2d(nnx.Module):
  """``torch.nn.Conv2d`` with symmetric zero padding; kernel HWIO."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               stride: int = 1, padding: int = 0, dilation: int = 1, use_bias: bool = True,
               init_a: float = 0.1, dtype: str = "float32", precision: str = "highest",
               rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(kaiming_normal(init_a)(rngs.params(), shape, jnp.float32))
    fan_in = in_features * kernel_size * kernel_size
    self.bias = (nnx.Param(torch_default_uniform(fan_in)(rngs.params(), (out_features,)))
                 if use_bias else None)
    self.stride = stride
    self.padding = padding
    self.dilation = dilation
    self.dtype = jnp.dtype(dtype)
    self.precision = _PRECISIONS[precision]

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=((self.padding, self.padding),) * 2,
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=_DIMENSION_NUMBERS, precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvTranspose2d(nnx.Module):
  """``torch.nn.ConvTranspose2d(k, stride, padding)`` as a dilated forward convolution.

  A transposed conv equals a stride-1 conv of the input dilated by ``stride`` with
  padding ``k - 1 - padding`` and the spatially flipped, in/out-swapped kernel. The
  stored ``kernel`` is that forward kernel (HWIO), so the call is one convolution;
  the converter flips PyTorch's IOHW weight into it.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               stride: int, padding: int, dtype: str = "float32", precision: str = "highest",
               rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features, out_features)
    # PyTorch computes the transposed conv's fan_in from its weight's dim 1 (out channels).
    fan_in = out_features * kernel_size * kernel_size
    self.kernel = nnx.Param(torch_default_uniform(fan_in)(rngs.params(), shape))
    self.bias = nnx.Param(torch_default_uniform(fan_in)(rngs.params(), (out_features,)))
    self.stride = stride
    self.edge = kernel_size - 1 - padding
    self.dtype = jnp.dtype(dtype)
    self.precision = _PRECISIONS[precision]

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(1, 1), padding=((self.edge, self.edge),) * 2,
        lhs_dilation=(self.stride, self.stride),
        dimension_numbers=_DIMENSION_NUMBERS, precision=self.precision)
    return y + self.bias[...].astype(self.dtype)


class ShareSepConv(nnx.Module):
  """Depthwise conv whose single (k, k) kernel is shared by every channel, no bias.

  The "smoothed dilated convolution" of Wang et al. (2018): placed before a conv
  dilated by d with k = 2d - 1 it mixes the d*d interleaved sub-grids the dilated
  conv would otherwise treat independently. Initialised to the identity.
  """

  def __init__(self, kernel_size: int, *, dtype: str = "float32"):
    if kernel_size % 2 != 1:
      raise ValueError(f"shared separable kernel size must be odd, got {kernel_size}")
    centre = kernel_size // 2
    self.kernel = nnx.Param(
        jnp.zeros((kernel_size, kernel_size), jnp.float32).at[centre, centre].set(1.0))
    self.dtype = jnp.dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    # A sum of k*k shifted, scaled copies rather than a grouped conv: XLA:CPU runs
    # feature_group_count=C convs ~20x slower than this fused elementwise loop
    # (benchmarks/layer_speed.py), and GPUs fuse it into one kernel as well.
    k = self.kernel.shape[0]
    pad = (k - 1) // 2
    h, w = x.shape[1:3]
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = self.kernel[...].astype(self.dtype)
    out = None
    for a in range(k):
      for b in range(k):
        term = kernel[a, b] * xp[:, a:a + h, b:b + w, :]
        out = term if out is None else out + term
    return out


class InstanceNorm(nnx.Module):
  """``torch.nn.InstanceNorm2d(affine=True)``: per sample and channel over H, W.

  Biased variance, no running statistics; statistics are taken in float32 whatever
  the compute dtype.
  """

  def __init__(self, features: int, *, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Scalar(nnx.Module):
  """``torch.nn.Linear(1, 1)`` applied elementwise: w * x + b (PyTorch init U(-1, 1))."""

  def __init__(self, *, rngs: nnx.Rngs):
    init = torch_default_uniform(1)
    self.kernel = nnx.Param(init(rngs.params(), (1, 1)))
    self.bias = nnx.Param(init(rngs.params(), (1,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.kernel[...][0, 0] + self.bias[...][0]
