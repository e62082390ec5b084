"""Seconds per training step of the released architecture (jitted, after compilation).

    python benchmarks/train_step_speed.py [--shapes 2x128x128 8x64x64 1x460x620] [--repeats 3]

For each batch shape (N x H x W) prints, on the default backend: the forward pass, the
forward + backward pass (loss and gradients of all parameters), and the whole training
step (forward, backward, Adam update; what `train.py` runs), each as the median of
`--repeats` timed calls, plus the first step's compile time. The step is the project's
own `make_train_step` with `configs/its_authors.py` (released architecture, loss "l2",
Adam at 0.01), started from random weights.

Where the time went before the step was fast (2x128x128 on a 2-core CPU): XLA:CPU
differentiates a convolution with an *input* dilation (how a transposed conv is usually
written: zeros between pixels, then a stride-1 conv) through a generic, very slow path:
the decoder's single 4x4 stride-2 transposed conv took ~300 ms of gradient for a 22 ms
forward, more than all 55 3x3 convs together, and so the step was slower with fewer
IM-block iterations than with more. `layers.ConvTranspose2d` now computes it sub-pixel
(four 2x2 convs of the undilated input, interleaved), whose gradient is an ordinary
conv's (`benchmarks/layer_speed.py --grad` times both forms).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax.train import cli, config_file
from minet_jax.train import state as state_lib
from minet_jax.train.step import loss_and_grads, make_train_step

its_authors = config_file.load_module(
    pathlib.Path(__file__).resolve().parents[1] / "configs" / "its_authors.py")


def median_seconds(fn, *args, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
  n, h, w = shape
  config = its_authors.get_config()
  rng = np.random.default_rng(0)
  batch = {"hazy": jnp.asarray(rng.random((n, h, w, 3), np.float32)),
           "clear": jnp.asarray(rng.random((n, h, w, 3), np.float32))}
  state = state_lib.create_train_state(config)
  model, _ = state.merge()
  key = jax.random.key(0)

  forward = nnx.jit(lambda m, x: m(x))
  grads = nnx.jit(lambda m, b: loss_and_grads(m, b, loss=config.loss, key=key))
  step = make_train_step(config.loss)

  start = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start

  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  model, _ = state.merge()
  jax.block_until_ready(forward(model, batch["hazy"]))
  jax.block_until_ready(grads(model, batch))
  return {"compile_s": compile_s, "step_s": statistics.median(times),
          "forward_s": median_seconds(forward, model, batch["hazy"], repeats=repeats),
          "forward_backward_s": median_seconds(grads, model, batch, repeats=repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=["2x128x128", "8x64x64", "1x460x620"],
                      help="batch shapes N x H x W")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--training-flags", action="store_true",
                      help="run with the XLA flags train.py adds under "
                           "MINET_XLA_TRAINING_FLAGS=1 (cli.TRAINING_XLA_FLAGS)")
  args = parser.parse_args()
  # As train.py does, before the backend starts (the next line starts it).
  flags = cli.add_xla_flags(enabled=args.training_flags or None)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}, "
        f"{os.cpu_count()} host cores ({platform.processor() or platform.machine()}); "
        f"XLA_FLAGS={flags!r}")
  print("released architecture (T=8, dilations 1/2/4, smoothed), loss l2, Adam; seconds")
  print(f"{'batch':>10} | {'forward':>8} | {'fwd+bwd':>8} | {'step':>8} | {'compile':>8}")
  for text in args.shapes:
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 3:
      raise SystemExit(f"--shapes takes N x H x W, got {text!r}")
    r = measure(shape, args.repeats)
    print(f"{text:>10} | {r['forward_s']:8.3f} | {r['forward_backward_s']:8.3f} | "
          f"{r['step_s']:8.3f} | {r['compile_s']:8.1f}", flush=True)


if __name__ == "__main__":
  main()
