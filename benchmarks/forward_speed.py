"""Seconds per image of the released architecture's forward pass, FLOP rate and compile time.

    python benchmarks/forward_speed.py [--sizes 620x460 2708x1800] [--repeats 3]
        [--dtype float32] [--conv-backends xla onednn] [--ckpt DIR] [--profile]

For every WIDTHxHEIGHT it times `minet_jax.apply` the way users call it: sizes up to
`minet_jax.core.strips.AUTO_PIXELS` (2 MP) as one jitted program (``jax.jit(apply)``), larger
ones eagerly, where `apply` runs the exact strip path (eight compiled stages, see
`minet_jax.core.strips`), once per ``--conv-backends`` setting (``ModelConfig.conv_backend``:
XLA's convolutions or oneDNN's). It prints, per size and setting:

* compile: for the jitted program XLA's lowering + compilation time; for the strip path
  the first call's wall time minus s/image (its stages compile on first use);
* s/image: the median of ``--repeats`` calls after the first;
* GFLOP: XLA's cost analysis of the whole-image jitted program with XLA's convolutions
  (compiled, never run; it cannot see into oneDNN's custom calls), i.e. the model's
  arithmetic; the strip path recomputes the early full-resolution layers,
  so its own count is somewhat higher than this;
* GFLOP/s: that count over s/image, against the CPU's float32 matmul rate measured in
  the same run (a 2048x2048 ``jnp.dot``), the practical ceiling for convolutions;
* XLA's compiled memory plan of the whole-image program (arguments + outputs +
  temporaries) and this process's peak RSS so far (a running maximum: sizes are run in
  the order given);
* with ``--profile``, for the one-program sizes: one call's per-operation time summed by
  kind of operation (convolutions, shifted sums, elementwise, reductions, ...;
  benchmarks/op_profile.py).

Weights: ``--ckpt`` (a `minet_jax.save` folder), else random weights of the released
architecture (the time does not depend on their values). docs/PRETRAINED.md quotes the
figures with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import minet_jax
import op_profile  # benchmarks/op_profile.py, beside this script
from minet_jax.core import strips


def _size(text: str) -> tuple[int, int]:
  try:
    width, height = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 620x460, got {text!r}")
  if width < 2 or height < 2:
    raise argparse.ArgumentTypeError(f"an image needs at least 2x2 pixels, got {text!r}")
  return width, height


def _seconds(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """The default device's float32 ``n x n`` matmul rate, GFLOP/s (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  dot(a, a).block_until_ready()
  return 2 * n**3 / min(_seconds(lambda: dot(a, a), repeats)) / 1e9


def _peak_rss_gb() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure(params: minet_jax.Params, width: int, height: int, repeats: int,
            profile: bool = False) -> dict:
  """Times one image size; returns the figures `main` prints."""
  image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
  whole = jax.jit(minet_jax.apply)
  start = time.perf_counter()
  compiled = whole.lower(params, image).compile()
  xla_compile_s = time.perf_counter() - start
  # The arithmetic as XLA counts it for its own convolutions (custom calls count zero).
  counted = params if params.config.conv_backend == "xla" else minet_jax.Params(
      weights=params.weights, config=dataclasses.replace(params.config, conv_backend="xla"))
  cost = whole.lower(counted, image).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  plan = compiled.memory_analysis()
  plan_gb = (plan.argument_size_in_bytes + plan.output_size_in_bytes
             + plan.temp_size_in_bytes) / 1e9
  stripped = height * width > strips.AUTO_PIXELS
  # Above AUTO_PIXELS users get the eager strip path; below it, one jitted program.
  call = (lambda: minet_jax.apply(params, image)) if stripped else (lambda: compiled(params, image))
  first = _seconds(call, 1)[0]
  times = _seconds(call, repeats)
  per_image = statistics.median(times)
  if profile and not stripped:
    op_profile.print_op_times(op_profile.op_times(compiled, params, image))
  flops = float(cost.get("flops", float("nan")))
  return {"path": "strips (eager stages)" if stripped else "one jitted program",
          # The jitted program was compiled above; the strip path compiles its stages
          # on the first call.
          "compile_s": max(first - per_image, 0.0) if stripped else xla_compile_s,
          "s_per_image": per_image, "gflop": flops / 1e9,
          "gflops_per_s": flops / 1e9 / per_image, "plan_gb": plan_gb,
          "peak_rss_gb": _peak_rss_gb()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=_size, nargs="+", default=[(620, 460)],
                      help="WIDTHxHEIGHT sizes, run in this order (default: 620x460)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="compute dtype (float32/bfloat16)")
  parser.add_argument("--conv-backends", nargs="+", default=["xla", "onednn"],
                      help="ModelConfig.conv_backend settings, each timed at every size")
  parser.add_argument("--ckpt", default="", help="weights folder (default: random weights)")
  parser.add_argument("--profile", action="store_true",
                      help="also print where the time goes, by kind of operation "
                           "(one-program sizes only; benchmarks/op_profile.py)")
  args = parser.parse_args(argv)

  if args.ckpt:
    loaded = minet_jax.load(args.ckpt)
    weights, config = loaded.weights, dataclasses.replace(loaded.config, dtype=args.dtype)
  else:
    base = minet_jax.init(minet_jax.ModelConfig(dtype=args.dtype))
    weights, config = base.weights, base.config
  peak = matmul_gflops()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{jax.local_device_count()} device(s); host: {platform.processor() or platform.machine()}"
        f"; float32 2048^3 matmul: {peak:.0f} GFLOP/s; dtype {args.dtype}")
  for width, height in args.sizes:
    for backend in args.conv_backends:
      params = minet_jax.Params(weights=weights,
                                config=dataclasses.replace(config, conv_backend=backend))
      r = measure(params, width, height, args.repeats, profile=args.profile)
      print(f"{width}x{height} {backend} [{r['path']}]: {r['s_per_image']:.2f} s/image (median of "
            f"{args.repeats}); compile {r['compile_s']:.1f} s; {r['gflop']:.0f} GFLOP, "
            f"{r['gflops_per_s']:.0f} GFLOP/s ({r['gflops_per_s'] / peak:.0%} of matmul); "
            f"XLA plan of the whole-image program {r['plan_gb']:.2f} GB; "
            f"peak RSS so far {r['peak_rss_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
  main()
