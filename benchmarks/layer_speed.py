"""Milliseconds per layer call at the IM-blocks' working size (a 620x460 image's half).

    python benchmarks/layer_speed.py [--batch 1 --height 230 --width 310] [--grad]

Compares ways of computing the shared separable (smoothing) conv: a grouped conv with
`feature_group_count=C`, and the sum of k*k shifted copies that `layers.ShareSepConv`
uses; plus the 3x3 (dilated) convs and the transposed conv for scale. With ``--grad``
it also times the gradients (input and kernel) of the two forms of each layer that
training differentiates: the transposed conv as an input-dilated conv vs the sub-pixel
`layers.ConvTranspose2d`, and the smoothing conv's plain autodiff vs
`layers.shared_smoothing` (custom JVP). ``--batch 2 --height 64 --width 64`` is what
those layers see in a 2x128x128 training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from minet_jax import layers

_DN = ("NHWC", "HWIO", "NHWC")


def time_ms(fn, *args, repeats: int = 5) -> float:
  fn = jax.jit(fn)
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
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.height, args.width, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64))
  print(f"backend {jax.default_backend()}, input {args.batch}x{args.height}x{args.width}x64")
  for d in (1, 2, 4):
    ms = time_ms(lambda x, w, d=d: lax.conv_general_dilated(
        x, w, (1, 1), ((d, d),) * 2, rhs_dilation=(d, d), dimension_numbers=_DN), x, w)
    print(f"3x3 conv, dilation {d}:              {ms:8.1f} ms")
  for k in (3, 7):
    kernel = jax.random.normal(jax.random.key(2), (k, k))
    print(f"shared {k}x{k} smoothing, grouped conv: {time_ms(grouped, x, kernel):8.1f} ms")
    print(f"shared {k}x{k} smoothing, shifted sum:  {time_ms(shifted_sum, x, kernel):8.1f} ms")
  half = x[:, ::2, ::2]
  wt = jax.random.normal(jax.random.key(3), (4, 4, 64, 64))
  ms = time_ms(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), ((2, 2),) * 2, lhs_dilation=(2, 2), dimension_numbers=_DN), half, wt)
  print(f"4x4 stride-2 transposed conv:        {ms:8.1f} ms")
  if args.grad:
    time_gradients(x, half, wt)


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


if __name__ == "__main__":
  main()
