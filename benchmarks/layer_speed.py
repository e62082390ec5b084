"""Milliseconds per layer call at the IM-blocks' working size (a 620x460 image's half).

    python benchmarks/layer_speed.py [--height 230 --width 310]

Compares ways of computing the shared separable (smoothing) conv: a grouped conv with
`feature_group_count=C`, and the sum of k*k shifted copies that `layers.ShareSepConv`
uses; plus the 3x3 (dilated) convs and the transposed conv for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def time_ms(fn, *args, repeats: int = 5) -> float:
  fn = jax.jit(fn)
  fn(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
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
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (1, args.height, args.width, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64))
  print(f"backend {jax.default_backend()}, input 1x{args.height}x{args.width}x64")
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


if __name__ == "__main__":
  main()
