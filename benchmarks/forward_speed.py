"""Seconds per image of the released architecture's forward pass (jitted, after compile).

    python benchmarks/forward_speed.py [--height 460 --width 620 --repeats 3]

Prints compile time and the median of `repeats` timed runs on the default backend. The
authors' PyTorch model takes about 4.8 s per 620x460 image on a 2-core CPU with 2 threads.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

import minet_jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--height", type=int, default=460)
  parser.add_argument("--width", type=int, default=620)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="compute dtype (float32/bfloat16)")
  args = parser.parse_args()

  params = minet_jax.init(minet_jax.ModelConfig(dtype=args.dtype))
  image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)
  forward = jax.jit(minet_jax.apply)
  start = time.perf_counter()
  forward(params, image).block_until_ready()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    forward(params, image).block_until_ready()
    times.append(time.perf_counter() - start)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{jax.local_device_count()} device(s); host: {platform.processor() or platform.machine()}")
  print(f"image {args.height}x{args.width}, dtype {args.dtype}: first call (compile+run) "
        f"{compile_s:.1f} s, then median {statistics.median(times):.2f} s/image "
        f"over {args.repeats} runs")


if __name__ == "__main__":
  main()
