"""Gradient step time through the IM-block iteration: rolled vs unrolled `lax.scan`.

    python benchmarks/unroll_grad.py [--size 64 --batch 2 --repeats 3]

On XLA:CPU, differentiating a rolled scan of convolutions is far slower than the same
computation unrolled (jax-ml/jax#12868), which is why `ModelConfig.unroll` defaults to
"auto" (fully unrolled on CPU, rolled on accelerators). Prints compile and step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import minet_jax


def time_grad(unroll, size: int, batch: int, repeats: int) -> tuple[float, float]:
  model = minet_jax.MINet(minet_jax.ModelConfig(unroll=unroll), rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3))

  @nnx.jit
  def grad_step(model, x):
    return nnx.grad(lambda m: jnp.mean(jnp.square(m(x) - x)))(model)

  start = time.perf_counter()
  jax.block_until_ready(grad_step(model, x))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad_step(model, x))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, {args.batch}x{args.size}x{args.size} crops, "
        "released architecture (3 blocks x 8 iterations)")
  for unroll in (1, True):
    compile_s, step_s = time_grad(unroll, args.size, args.batch, args.repeats)
    label = "rolled (unroll=1)" if unroll == 1 else "unrolled (unroll=True)"
    print(f"{label:24s} compile+first {compile_s:6.1f} s   grad step {step_s:7.3f} s")


if __name__ == "__main__":
  main()
