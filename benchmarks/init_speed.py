"""Time to initialise MI-Net's weights, with JAX's default threefry and the classic one.

    python benchmarks/init_speed.py [--features 64] [--repeats 2]

`minet_jax.init` and `create_train_state` draw the ~100 weight tensors eagerly under
``jax.threefry_partitionable(False)``: on XLA:CPU the partitionable threefry (JAX's
default) compiles more slowly per tensor shape. Each initialisation here starts from
empty compilation caches, as the first one of a process does. Prints seconds per
initialisation of the released architecture (or ``--features`` wide) for each form.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

import minet_jax


def time_init(cfg: minet_jax.ModelConfig, partitionable: bool) -> float:
  jax.clear_caches()
  start = time.perf_counter()
  with jax.threefry_partitionable(partitionable):
    model = minet_jax.MINet(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
  jax.block_until_ready(nnx.state(model))
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--features", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  cfg = minet_jax.ModelConfig(features=args.features)
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, features {cfg.features}")
  times: dict[bool, list[float]] = {True: [], False: []}
  time_init(cfg, False)  # Imports and one-off setup out of the timings.
  for _ in range(args.repeats):
    for partitionable in (True, False):  # Interleaved: both see the same machine load.
      times[partitionable].append(time_init(cfg, partitionable))
  for partitionable, label in ((True, "partitionable (JAX's default)"), (False, "classic")):
    print(f"{label:30s} {statistics.median(times[partitionable]):7.2f} s per init "
          f"({', '.join(f'{t:.2f}' for t in times[partitionable])})")


if __name__ == "__main__":
  main()
