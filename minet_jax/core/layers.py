"""Layers with PyTorch's exact semantics, in NHWC.

The released weights were trained in PyTorch, so padding, transposed convolution,
instance-norm statistics and initialisation follow ``torch.nn`` precisely; the
parameter names (``kernel``, ``bias``, ``scale``) are Flax's. Layouts: conv kernels
are HWIO, the transposed conv stores the equivalent forward-conv kernel (HWIO,
spatially flipped), the shared separable kernel is a single ``(k, k)`` array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from minet_jax.core.config import CONV_BACKENDS

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


class Convolutions(NamedTuple):
  """One implementation of the model's three kinds of convolution (NHWC images, HWIO
  kernels, zero padding); `convolutions` picks one for a backend and dtype."""

  conv: Callable[..., jax.Array]
  """``conv(x, kernel, *, strides, padding, dilation, precision)``: a dense convolution."""
  conv_transpose: Callable[..., jax.Array]
  """``conv_transpose(x, kernel, *, stride, padding, precision)``: ``torch.nn.ConvTranspose2d``
  (no bias) with the kernel stored as `ConvTranspose2d` stores it."""
  smoothing: Callable[..., jax.Array]
  """``smoothing(x, kernel)``: every channel convolved with the one (k, k) `kernel`, same size."""


def _xla_conv(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
              precision=None):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=_DIMENSION_NUMBERS, precision=precision)


def _sub_pixel(kernel_size: int, stride: int, padding: int) -> bool:
  """Whether a transposed conv's output is exactly `stride` times its input."""
  return kernel_size - 2 * padding == stride


def _phase(a: int, stride: int, kernel_size: int, edge: int) -> tuple[slice, tuple[int, int]]:
  """Kernel taps that reach output phase `a` along one axis (every s-th), and the padding.

  In the dilated form output o = s*i + a reads dilated position o + t - edge for tap
  t; it holds input pixel i + (a + t - edge) / s when that is an integer, else a zero.
  """
  taps = [t for t in range(kernel_size) if (a + t - edge) % stride == 0]
  offsets = [(a + t - edge) // stride for t in taps]
  return slice(taps[0], taps[-1] + 1, stride), (-offsets[0], offsets[-1])


def _xla_conv_transpose(x, kernel, *, stride, padding, precision=None):
  """The stride-1 conv of the input dilated by `stride`, or its sub-pixel form
  (`ConvTranspose2d` says why)."""
  k, s = kernel.shape[0], stride
  edge = k - 1 - padding
  if not _sub_pixel(k, s, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((edge, edge),) * 2,
        lhs_dilation=(s, s), dimension_numbers=_DIMENSION_NUMBERS, precision=precision)
  phases = [_phase(a, s, k, edge) for a in range(s)]
  rows = []
  for taps_a, pad_a in phases:
    row = []
    for taps_b, pad_b in phases:
      row.append(_xla_conv(x, kernel[taps_a, taps_b], padding=(pad_a, pad_b),
                           precision=precision))
    rows.append(jnp.stack(row, axis=3))                     # N, H, W, s(b), C
  y = jnp.stack(rows, axis=2)                               # N, H, s(a), W, s(b), C
  n, h, _, w, _, c = y.shape
  return y.reshape(n, h * s, w * s, c)


def _onednn():
  """`minet_jax.core.onednn`, imported on first use: it registers JAX primitives and is only
  needed where it runs the convolutions."""
  from minet_jax.core import onednn
  return onednn


def _onednn_conv(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
                 precision=None):
  onednn = _onednn()
  return onednn.conv(x, kernel, strides=strides, padding=padding, dilation=dilation,
                     bf16_products=_bf16_products(onednn, precision, x.dtype))


def _onednn_conv_transpose(x, kernel, *, stride, padding, precision=None):
  """What a transposed conv is by definition: the input gradient of the stride-s conv it
  transposes, whose kernel is the stored one unflipped, in/out swapped. oneDNN writes it
  straight into the output (no zeros, no interleaving)."""
  onednn = _onednn()
  k, s = kernel.shape[0], stride
  out_hw = [(n - 1) * s - 2 * padding + k for n in x.shape[1:3]]
  return onednn.conv_input(x, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)), out_hw,
                           strides=(s, s), padding=((padding, padding),) * 2,
                           bf16_products=_bf16_products(onednn, precision, x.dtype))


def _onednn_smoothing(x, kernel):
  """A depthwise conv whose C kernels are all `kernel`: oneDNN's depthwise kernels beat
  both XLA forms, forward and backward; the kernel's gradient is the sum of the C
  per-channel ones."""
  k, c = kernel.shape[0], x.shape[-1]
  pad = (k - 1) // 2
  return _onednn().conv(x, jnp.broadcast_to(kernel[:, :, None, None], (k, k, 1, c)),
                        padding=((pad, pad), (pad, pad)), groups=c)


@functools.cache
def _warn_unimportable(reason: str) -> None:
  warnings.warn("conv_backend='auto' runs XLA's convolutions: minet_jax.core.onednn cannot be "
                f"imported ({reason})", stacklevel=4)


def _onednn_runs(backend: str, dtype) -> bool:
  """Whether oneDNN runs `dtype` convolutions under `backend` (`onednn.use_onednn`).

  oneDNN serves CPUs only, so elsewhere, and for "xla", its module is not imported.
  A module that cannot be imported (a JAX without the APIs it registers primitives
  with) is an error for "onednn" and, with a warning, XLA's convolutions for "auto".
  """
  if backend not in CONV_BACKENDS:
    raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {backend!r}")
  if backend == "xla" or jax.default_backend() != "cpu":
    return False
  try:
    onednn = _onednn()
  except ImportError as e:
    if backend == "onednn":
      raise ImportError(f"conv_backend='onednn' needs minet_jax.core.onednn, which cannot be "
                        f"imported: {e}") from e
    _warn_unimportable(f"{type(e).__name__}: {e}")
    return False
  return onednn.use_onednn(backend, dtype)


def convolutions(backend: str, dtype: jnp.dtype | str) -> Convolutions:
  """Who runs `dtype` convolutions under ``ModelConfig.conv_backend=backend``
  (`minet_jax.core.config.CONV_BACKENDS`): oneDNN's kernels where
  `minet_jax.core.onednn.use_onednn` says so, XLA's everywhere else."""
  return _ONEDNN if _onednn_runs(backend, dtype) else _XLA


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int] = (1, 1),
           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
           dilation: tuple[int, int] = (1, 1), precision: jax.lax.Precision | None = None,
           backend: str = "auto") -> jax.Array:
  """A dense NHWC x HWIO convolution, run as `convolutions(backend, dtype)` picks
  (XLA's for operands of two dtypes)."""
  impl = convolutions(backend, x.dtype) if x.dtype == kernel.dtype else _XLA
  return impl.conv(x, kernel, strides=strides, padding=padding, dilation=dilation,
                   precision=precision)


def _bf16_products(onednn: Any, precision: jax.lax.Precision | None,
                   dtype: jnp.dtype) -> bool:
  """Whether oneDNN rounds `dtype` operands to bfloat16 at `precision` (float32 only).

  bfloat16 operands already have bfloat16 products with float32 sums, which is all
  that precision="default" asks for, so for them the precision changes nothing.
  """
  return jnp.dtype(dtype) == jnp.float32 and onednn.bf16_products_for(precision)


def kaiming_normal(a: float) -> jax.nn.initializers.Initializer:
  """PyTorch's ``kaiming_normal_(w, a)``: N(0, 2 / ((1 + a^2) fan_in)), fan_in = k*k*in."""
  return jax.nn.initializers.variance_scaling(
      2.0 / (1.0 + a * a), "fan_in", "normal", in_axis=-2, out_axis=-1)


def torch_default_uniform(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch's default bias (and Linear/ConvTranspose weight) init: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class RowGeometry:
  """Which input rows each output row of a convolution reads (columns alike).

  A conv with ``kernel`` taps, ``stride`` s, ``dilation`` d and symmetric zero
  ``padding`` p makes output row o from input rows s*o - p + d*t, t < k; a transposed
  conv (``transposed``, PyTorch's: input row i adds to output rows s*i - p + t) makes
  it from every input row i with s*i = o + p - t. Input rows outside the map are the
  padding's zeros.
  """

  kernel: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  transposed: bool = False

  def reads(self, row: int) -> tuple[int, int]:
    """The first and last input row that output `row` reads (those between may be
    skipped by the dilation or the stride, none outside); rows outside the input
    are padding."""
    k, s, p = self.kernel, self.stride, self.padding
    if self.transposed:
      return -((k - 1 - row - p) // s), (row + p) // s
    first = s * row - p
    return first, first + self.dilation * (k - 1)

  def size(self, rows: int) -> int:
    """Output rows of an input `rows` high."""
    k, s, p = self.kernel, self.stride, self.padding
    if self.transposed:
      return (rows - 1) * s - 2 * p + k
    return (rows + 2 * p - self.dilation * (k - 1) - 1) // s + 1

  @property
  def scale(self) -> Fraction:
    """Output rows per input row (the resolution change)."""
    return Fraction(self.stride) if self.transposed else Fraction(1, self.stride)

  @property
  def phase(self) -> int:
    """The layer run on input rows from a row that is a multiple of `phase` on gives
    rows of its whole-map output (from `first_output` on); from any other row it
    samples between them."""
    return 1 if self.transposed else self.stride

  def first_output(self, first_input: int) -> int:
    """The output row that the layer run on input rows from `first_input` on (a
    multiple of `phase`) gives first."""
    if first_input % self.phase:
      raise ValueError(f"a stride-{self.stride} conv run from input row {first_input} "
                       "gives no row of its whole output")
    return first_input * self.stride if self.transposed else first_input // self.stride


class Conv2d(nnx.Module):
  """``torch.nn.Conv2d`` with symmetric zero padding; kernel HWIO."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               stride: int = 1, padding: int = 0, dilation: int = 1, use_bias: bool = True,
               init_a: float = 0.1, dtype: str = "float32", precision: str = "highest",
               backend: str = "auto", rngs: nnx.Rngs):
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
    self.backend = backend

  @property
  def row_geometry(self) -> RowGeometry:
    """Which input rows each output row reads."""
    return RowGeometry(self.kernel.shape[0], self.stride, self.dilation, self.padding)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0:
      # A 1x1 conv is a matrix product over channels. XLA:CPU runs it as a dot several
      # times faster than as a convolution when it has few output channels (the
      # decoder's 64 -> 3 at full resolution), with the same result: measured by
      # benchmarks/layer_speed.py, figures in docs/PERFORMANCE.md.
      y = jax.lax.dot_general(
          x.astype(self.dtype), self.kernel[...][0, 0].astype(self.dtype),
          (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
      return y if self.bias is None else y + self.bias[...].astype(self.dtype)
    y = convolutions(self.backend, self.dtype).conv(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        strides=(self.stride, self.stride), padding=((self.padding, self.padding),) * 2,
        dilation=(self.dilation, self.dilation), precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvTranspose2d(nnx.Module):
  """``torch.nn.ConvTranspose2d(k, stride, padding)``; kernel stored as a forward conv's.

  A transposed conv equals a stride-1 conv of the input dilated by ``stride`` (zeros
  between pixels) with padding ``k - 1 - padding`` and the spatially flipped,
  in/out-swapped kernel. The stored ``kernel`` is that forward kernel (HWIO); the
  converter flips PyTorch's IOHW weight into it.

  When the output is exactly ``stride`` times the input (``k - 2 * padding == stride``,
  as for the released 4x4, stride-2, padding-1 layer) the call is sub-pixel: output
  pixel ``(s*i + a, s*j + b)`` only ever meets the kernel taps of phase ``(a, b)``, so
  each of the s*s phases is an ordinary small conv of the undilated input (2x2 for the
  released layer), and the phases are interleaved into the output. That skips the
  (1 - 1/s^2) of the dilated conv's multiply-adds that fall on inserted zeros, and its
  gradient is an ordinary conv's, which XLA:CPU differentiates far faster than the
  input-dilated conv (``benchmarks/layer_speed.py --grad``). Other shapes use the
  dilated conv. With oneDNN any shape is the input gradient of the strided conv it
  transposes (`onednn.conv_input`), written straight into the output with no
  interleaving. `convolutions` picks which.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               stride: int, padding: int, dtype: str = "float32", precision: str = "highest",
               backend: str = "auto", rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features, out_features)
    # PyTorch computes the transposed conv's fan_in from its weight's dim 1 (out channels).
    fan_in = out_features * kernel_size * kernel_size
    self.kernel = nnx.Param(torch_default_uniform(fan_in)(rngs.params(), shape))
    self.bias = nnx.Param(torch_default_uniform(fan_in)(rngs.params(), (out_features,)))
    self.stride = stride
    self.padding = padding
    self.sub_pixel = _sub_pixel(kernel_size, stride, padding)
    self.dtype = jnp.dtype(dtype)
    self.precision = _PRECISIONS[precision]
    self.backend = backend

  @property
  def row_geometry(self) -> RowGeometry:
    """Which input rows each output row reads."""
    return RowGeometry(self.kernel.shape[0], self.stride, padding=self.padding, transposed=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = convolutions(self.backend, self.dtype).conv_transpose(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), stride=self.stride,
        padding=self.padding, precision=self.precision)
    return y + self.bias[...].astype(self.dtype)


class ShareSepConv(nnx.Module):
  """Depthwise conv whose single (k, k) kernel is shared by every channel, no bias.

  The "smoothed dilated convolution" of Wang et al. (2018): placed before a conv
  dilated by d with k = 2d - 1 it mixes the d*d interleaved sub-grids the dilated
  conv would otherwise treat independently. Initialised to the identity.
  """

  def __init__(self, kernel_size: int, *, dtype: str = "float32", backend: str = "auto"):
    if kernel_size % 2 != 1:
      raise ValueError(f"shared separable kernel size must be odd, got {kernel_size}")
    centre = kernel_size // 2
    self.kernel = nnx.Param(
        jnp.zeros((kernel_size, kernel_size), jnp.float32).at[centre, centre].set(1.0))
    self.dtype = jnp.dtype(dtype)
    self.backend = backend

  @property
  def row_geometry(self) -> RowGeometry:
    """Which input rows each output row reads (same size, zero padding)."""
    k = self.kernel.shape[0]
    return RowGeometry(k, padding=(k - 1) // 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return smoothing(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                     backend=self.backend)


def smoothing(x: jax.Array, kernel: jax.Array, *, backend: str = "auto") -> jax.Array:
  """Every channel of NHWC `x` convolved with the one (k, k) `kernel`, zero padding, run
  as `convolutions(backend, dtype)` picks: `shared_smoothing` in XLA, a depthwise conv
  in oneDNN (XLA's for operands of two dtypes)."""
  impl = convolutions(backend, x.dtype) if x.dtype == kernel.dtype else _XLA
  return impl.smoothing(x, kernel)


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_{a,b} kernel[a, b] * x shifted by (a - p, b - p), zero padded: the smoothing conv.

  A sum of k*k shifted, scaled copies rather than a grouped conv: XLA:CPU runs
  feature_group_count=C convs far slower than this fused elementwise loop
  (``benchmarks/layer_speed.py``), and GPUs fuse it into one kernel as well.
  """
  k = kernel.shape[0]
  pad = (k - 1) // 2
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for a in range(k):
    for b in range(k):
      term = kernel[a, b] * xp[:, a:a + h, b:b + w, :]
      out = term if out is None else out + term
  return out


# Width of the column blocks of `_banded_smoothing`.
_BAND_BLOCK = 16


def _banded_smoothing(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same map as `_shifted_sum`, written as banded matrix products over column blocks.

  Columns are cut into blocks of B with a halo of p on each side; within a block, row
  shift a applies the B x (B + 2p) banded matrix T_a[j, j + b] = kernel[a, b] to the
  block's columns for every (sample, row, channel). It takes (B + 2p) / k times the
  multiply-adds of the shifted sum, so it is not the forward pass; it is the form whose
  transposes are cheap: matrix products and two pads, where the shifted sum's are k*k
  full-size reductions (for the kernel) and k*k pads that XLA merges into one huge
  addition across the unrolled IM-block iterations (for the input).
  """
  k = kernel.shape[0]
  pad = (k - 1) // 2
  n, h, w, c = x.shape
  block = max(_BAND_BLOCK, 2 * pad)
  blocks = -(-w // block)
  # Columns minor, so every product contracts the last axis (no per-shift transposes).
  xt = jnp.pad(jnp.transpose(x, (0, 1, 3, 2)),
               ((0, 0), (pad, pad), (0, 0), (pad, blocks * block + block - w - pad)))
  # Block j's window is padded columns [j*B, j*B + B + 2p): the block itself, then the
  # first 2p columns of the next block. Static slices and reshapes only, so the
  # transpose is two pads, not a scatter.
  main = xt[..., :blocks * block].reshape(n, h + 2 * pad, c, blocks, block)
  nxt = xt[..., block:(blocks + 1) * block].reshape(n, h + 2 * pad, c, blocks, block)
  windows = jnp.concatenate([main, nxt[..., :2 * pad]], axis=-1)  # n, h+2p, c, blocks, B+2p
  band = np.zeros((k, block, block + 2 * pad), np.float32)
  for b in range(k):
    band[b, np.arange(block), np.arange(block) + b] = 1.0
  # HIGHEST here too: a GPU's default (TF32) would round the kernel's values themselves.
  toeplitz = jnp.einsum("ab,bjq->ajq", kernel, band.astype(kernel.dtype),
                        precision=jax.lax.Precision.HIGHEST)
  out = sum(jnp.einsum("nhcbq,jq->nhcbj", windows[:, a:a + h], toeplitz[a],
                       precision=jax.lax.Precision.HIGHEST) for a in range(k))
  return jnp.transpose(out.reshape(n, h, c, blocks * block)[..., :w], (0, 1, 3, 2))


@jax.custom_jvp
def shared_smoothing(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Every channel of NHWC `x` convolved with the one (k, k) `kernel`, zero padding.

  Differentiated through a custom JVP. The map is bilinear, so its tangent is
  S(dx, kernel) + S(x, dkernel); both terms are written in the banded-matrix form of
  `_banded_smoothing`, so reverse mode (which transposes the tangent) gets both
  gradients from matrix products. Plain autodiff of the shifted sum made the 7x7
  smoothing the costliest part of a training step (``benchmarks/layer_speed.py --grad``
  compares the two).
  """
  return _shifted_sum(x, kernel)


@functools.partial(shared_smoothing.defjvp, symbolic_zeros=True)
def _shared_smoothing_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  out = _shifted_sum(x, kernel)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_banded_smoothing(dx, kernel))
  if not isinstance(dkernel, SymbolicZero):
    terms.append(_banded_smoothing(x, dkernel))
  return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_XLA = Convolutions(_xla_conv, _xla_conv_transpose, shared_smoothing)
_ONEDNN = Convolutions(_onednn_conv, _onednn_conv_transpose, _onednn_smoothing)


class InstanceNorm(nnx.Module):
  """``torch.nn.InstanceNorm2d(affine=True)``: per sample and channel over H, W.

  Biased variance, no running statistics; statistics are taken in float32 whatever
  the compute dtype. The call is `normalize` with `statistics` of its input; a caller
  that has the statistics of a larger map (taken piece by piece) normalises a piece
  of it with `normalize` alone.
  """

  def __init__(self, features: int, *, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.eps = eps

  def statistics(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of NHWC `x` per sample and channel, float32, (N, 1, 1, C)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    return mean, jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)

  def normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """`x` normalised with the given float32 statistics (broadcast against NHWC), then
    scaled and shifted; in `x`'s dtype."""
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.normalize(x, *self.statistics(x))


class Scalar(nnx.Module):
  """``torch.nn.Linear(1, 1)`` applied elementwise: w * x + b (PyTorch init U(-1, 1))."""

  def __init__(self, *, rngs: nnx.Rngs):
    init = torch_default_uniform(1)
    self.kernel = nnx.Param(init(rngs.params(), (1, 1)))
    self.bias = nnx.Param(init(rngs.params(), (1,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.kernel[...][0, 0] + self.bias[...][0]
