"""Milliseconds per layer call at the IM-blocks' working size (a 620x460 image's half).

    python benchmarks/layer_speed.py [--batch 1 --height 230 --width 310] [--grad] [--wgrad]
        [--ynn-fusions default] [--conv-backends xla onednn]

Compares ways of computing the shared separable (smoothing) conv: a grouped conv with
`feature_group_count=C`, and the sum of k*k shifted copies that `layers.ShareSepConv`
uses; plus the 3x3 (dilated) convs and the transposed conv for scale. With ``--grad``
it also times the gradients (input and kernel) of the two forms of each layer that
training differentiates: the transposed conv as an input-dilated conv vs the sub-pixel
`layers.ConvTranspose2d`, and the smoothing conv's plain autodiff vs
`layers.shared_smoothing` (custom JVP). ``--batch 2 --height 64 --width 64`` is what
those layers see in a 2x128x128 training step.

``--wgrad`` splits a 3x3 conv's gradient into its input and weight (kernel) parts, the
weight gradient being the slow one on XLA:CPU, and times two matrix-product forms of
that weight gradient beside XLA's: nine per-tap products (C x NHW) @ (NHW x C), and one
im2col product (9C x NHW) @ (NHW x C). Each is checked against XLA's before it is timed.

``--conv-backends xla onednn`` times, for each `ModelConfig.conv_backend` given, a 3x3
64 -> 64 conv (`layers.conv2d`) and the 3x3 and 7x7 shared smoothing
(`layers.smoothing`): forward, and forward plus both gradients.

``--ynn-fusions dot`` compiles every timed program the way the training step is
compiled with ``config.xla_cpu_ynn_fusions = "dot"`` (YNNPACK for matrix products
only, convolutions in XLA's own kernels).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from minet_jax.core import layers
from minet_jax.train.step import cpu_compiler_options

_DN = ("NHWC", "HWIO", "NHWC")
# Set from --ynn-fusions: XLA options every timed program is compiled with.
_COMPILER_OPTIONS = None


def time_ms(fn, *args, repeats: int = 5) -> float:
  fn = jax.jit(fn, compiler_options=_COMPILER_OPTIONS)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def grouped(x, kernel):
  k = kernel.shape[0]
  pad = (k - 1) // 2
  full = jnp.broadcast_to(kernel[:, :, None, None], (k, k, 1, x.shape[-1]))
  return lax.conv_general_dilated(x, full, (1, 1), ((pad, pad),) * 2,
                                  feature_group_count=x.shape[-1], dimension_numbers=_DN)


def shifted_sum(x, kernel):
  """The smoothing conv as plain code (`layers.shared_smoothing` without its custom JVP)."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return sum(kernel[a, b] * xp[:, a:a + h, b:b + w, :] for a in range(k) for b in range(k))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--height", type=int, default=230)
  parser.add_argument("--width", type=int, default=310)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--grad", action="store_true", help="also time the gradients")
  parser.add_argument("--wgrad", action="store_true",
                      help="also time a 3x3 conv's input and weight gradients, and the "
                           "weight gradient as matrix products")
  parser.add_argument("--conv-backends", nargs="*", default=[],
                      help="also time the convolution backends given (xla, onednn)")
  parser.add_argument("--ynn-fusions", default="default",
                      help="what XLA:CPU hands to YNNPACK, as config.xla_cpu_ynn_fusions")
  args = parser.parse_args()
  global _COMPILER_OPTIONS
  _COMPILER_OPTIONS = cpu_compiler_options(args.ynn_fusions)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.height, args.width, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64))
  print(f"backend {jax.default_backend()}, input {args.batch}x{args.height}x{args.width}x64, "
        f"compiler options {_COMPILER_OPTIONS}")
  for d in (1, 2, 4):
    ms = time_ms(lambda x, w, d=d: lax.conv_general_dilated(
        x, w, (1, 1), ((d, d),) * 2, rhs_dilation=(d, d), dimension_numbers=_DN), x, w)
    print(f"3x3 conv, dilation {d}:              {ms:8.1f} ms")
  for k in (3, 7):
    kernel = jax.random.normal(jax.random.key(2), (k, k))
    print(f"shared {k}x{k} smoothing, grouped conv: {time_ms(grouped, x, kernel):8.1f} ms")
    print(f"shared {k}x{k} smoothing, shifted sum:  "
          f"{time_ms(layers.shared_smoothing, x, kernel):8.1f} ms")
  # The decoder's last conv (1x1, 64 -> 3) runs at full resolution: twice H and W.
  full = jax.image.resize(x, (args.batch, 2 * args.height, 2 * args.width, 64), "nearest")
  w1 = jax.random.normal(jax.random.key(6), (1, 1, 64, 3))
  as_conv = time_ms(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), ((0, 0),) * 2, dimension_numbers=_DN, precision=lax.Precision.HIGHEST),
      full, w1)
  as_dot = time_ms(lambda x, w: lax.dot_general(
      x, w[0, 0], (((3,), (0,)), ((), ())), precision=lax.Precision.HIGHEST), full, w1)
  print(f"1x1 conv 64->3 at {2 * args.height}x{2 * args.width}: as a convolution {as_conv:.1f} "
        f"ms, as a matrix product (layers.Conv2d) {as_dot:.1f} ms")
  half = x[:, ::2, ::2]
  wt = jax.random.normal(jax.random.key(3), (4, 4, 64, 64))
  ms = time_ms(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), ((2, 2),) * 2, lhs_dilation=(2, 2), dimension_numbers=_DN), half, wt)
  print(f"4x4 stride-2 transposed conv:        {ms:8.1f} ms")
  if args.grad:
    time_gradients(x, half, wt)
  if args.wgrad:
    time_weight_gradients(x, w)
  if args.conv_backends:
    time_backends(x, w, args.conv_backends)


def time_backends(x: jax.Array, w: jax.Array, backends: list[str]) -> None:
  """The 3x3 conv and the shared smoothing per convolution backend: forward, fwd + grads."""
  smooth = {k: jax.random.normal(jax.random.key(2), (k, k)) for k in (3, 7)}
  for backend in backends:
    conv = lambda x, w, b=backend: layers.conv2d(x, w, padding=((1, 1), (1, 1)),
                                                 precision=lax.Precision.HIGHEST, backend=b)
    print(f"{backend:>6}: 3x3 conv 64->64        forward {time_ms(conv, x, w):8.1f} ms, "
          f"forward + gradients {_grad_ms(conv, x, w):8.1f} ms")
    for k, kernel in smooth.items():
      fn = lambda x, kernel, b=backend: layers.smoothing(x, kernel, backend=b)
      print(f"{backend:>6}: shared {k}x{k} smoothing  forward {time_ms(fn, x, kernel):8.1f} ms, "
            f"forward + gradients {_grad_ms(fn, x, kernel):8.1f} ms")


def _grad_ms(fn, *args) -> float:
  """Milliseconds of the gradient of sum(fn(*args) * g) with respect to every argument."""
  g = jax.random.normal(jax.random.key(4), jax.eval_shape(fn, *args).shape)
  grad = jax.grad(lambda *a: jnp.sum(fn(*a) * g), argnums=tuple(range(len(args))))
  return time_ms(grad, *args)


def time_gradients(x: jax.Array, half: jax.Array, kernel: jax.Array) -> None:
  """Forward and gradient of the old and the current form of the differentiated layers."""
  graphdef, state = nnx.split(
      layers.ConvTranspose2d(64, 64, 4, stride=2, padding=1, rngs=nnx.Rngs(0)))

  def dilated(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((2, 2),) * 2, lhs_dilation=(2, 2),
                                    dimension_numbers=_DN, precision=lax.Precision.HIGHEST)

  def sub_pixel(x, w):
    held = jax.tree.map(lambda v: v, state)  # A fresh State per trace, holding kernel w.
    nnx.replace_by_pure_dict(held, {**nnx.to_pure_dict(state), "kernel": w})
    return nnx.merge(graphdef, held)(x)

  for name, fn in (("input-dilated", dilated), ("sub-pixel (layers)", sub_pixel)):
    print(f"transposed conv, {name:19s} forward {time_ms(fn, half, kernel):8.1f} ms, "
          f"gradient {_grad_ms(fn, half, kernel):8.1f} ms")
  for k in (3, 7):
    smoothing = jax.random.normal(jax.random.key(2), (k, k))
    for name, fn in (("autodiff", shifted_sum), ("custom JVP (layers)", layers.shared_smoothing)):
      print(f"shared {k}x{k} smoothing, {name:19s} gradient {_grad_ms(fn, x, smoothing):8.1f} ms")


def _shifted_windows(x: jax.Array, d: int) -> list[jax.Array]:
  """The nine (N, H, W, C) windows of the zero-padded input a 3x3 conv of dilation d reads."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
  return [xp[:, a * d:a * d + h, b * d:b * d + w, :] for a in range(3) for b in range(3)]


def weight_grad_per_tap(x: jax.Array, dy: jax.Array, d: int) -> jax.Array:
  """dL/dW of a 3x3 conv (HWIO) as nine (C x NHW) @ (NHW x C) products."""
  c = x.shape[-1]
  flat = dy.reshape(-1, dy.shape[-1])
  taps = [lax.dot_general(v.reshape(-1, c), flat, (((0,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST) for v in _shifted_windows(x, d)]
  return jnp.stack(taps).reshape(3, 3, c, -1)


def weight_grad_im2col(x: jax.Array, dy: jax.Array, d: int) -> jax.Array:
  """dL/dW of a 3x3 conv (HWIO) as one (9C x NHW) @ (NHW x C) product."""
  c = x.shape[-1]
  cols = jnp.concatenate(_shifted_windows(x, d), axis=-1).reshape(-1, 9 * c)
  grad = lax.dot_general(cols, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST)
  return grad.reshape(3, 3, c, -1)


def time_weight_gradients(x: jax.Array, w: jax.Array) -> None:
  """A 3x3 conv's forward, input and weight gradients, and two GEMM weight gradients."""
  dy = jax.random.normal(jax.random.key(5), x.shape)
  for d in (1, 2, 4):
    def conv(x, w, d=d):
      return lax.conv_general_dilated(x, w, (1, 1), ((d, d),) * 2, rhs_dilation=(d, d),
                                      dimension_numbers=_DN, precision=lax.Precision.HIGHEST)

    def input_grad(x, w, dy, conv=conv):
      return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]

    def weight_grad(x, w, dy, conv=conv):
      return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]

    reference = jax.jit(weight_grad, compiler_options=_COMPILER_OPTIONS)(x, w, dy)
    line = [f"3x3 conv, dilation {d}: forward {time_ms(conv, x, w):7.1f} ms, input gradient "
            f"{time_ms(input_grad, x, w, dy):7.1f} ms, weight gradient: XLA "
            f"{time_ms(weight_grad, x, w, dy):7.1f} ms"]
    for name, fn in (("per-tap GEMMs", weight_grad_per_tap), ("im2col GEMM", weight_grad_im2col)):
      got = jax.jit(fn, static_argnums=2, compiler_options=_COMPILER_OPTIONS)(x, dy, d)
      error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
      if error > 1e-4:
        raise SystemExit(f"{name} differs from XLA's weight gradient (relative {error:.1e})")
      line.append(f"{name} {time_ms(lambda x, dy, fn=fn: fn(x, dy, d), x, dy):7.1f} ms")
    print(", ".join(line))


if __name__ == "__main__":
  main()
