"""Gradient step time through the IM-block iteration: rolled vs unrolled `lax.scan`.

    python benchmarks/unroll_grad.py [--size 64 --batch 2 --repeats 3] [--conv-backends xla onednn]

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


def time_grad(unroll, size: int, batch: int, repeats: int,
              conv_backend: str = "auto") -> tuple[float, float]:
  model = minet_jax.MINet(minet_jax.ModelConfig(unroll=unroll, conv_backend=conv_backend),
                          rngs=nnx.Rngs(0))
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
  parser.add_argument("--conv-backends", nargs="+", default=["auto"],
                      choices=minet_jax.core.config.CONV_BACKENDS,
                      help="ModelConfig.conv_backend values to time, one after the other")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, "
        f"{args.batch}x{args.size}x{args.size} crops, released architecture "
        "(3 blocks x 8 iterations)")
  for conv_backend in args.conv_backends:
    for unroll in (1, True):
      compile_s, step_s = time_grad(unroll, args.size, args.batch, args.repeats, conv_backend)
      label = f"{conv_backend}, " + ("unrolled (unroll=True)" if unroll is True
                                      else "rolled (unroll=1)")
      print(f"{label:32s} compile+first {compile_s:6.1f} s   grad step {step_s:7.3f} s")


if __name__ == "__main__":
  main()
