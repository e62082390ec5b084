"""Seconds per training step (jitted, after compilation); the released architecture by default.

    python benchmarks/train_step_speed.py [--shapes 2x128x128 8x64x64 1x460x620] [--repeats 3]
        [--config configs/its_authors.py] [--conv-backends xla onednn]
        [--ynn-fusions default dot] [--profile]

For each batch shape (N x H x W) prints, on the default backend: the forward pass, the
forward + backward pass (loss and gradients of all parameters), and the whole training
step (forward, backward, Adam update; what `train.py` runs), each as the median of
`--repeats` timed calls, plus the first step's compile time. The step is the project's
own `make_train_step` with `configs/its_authors.py` (released architecture, loss "l2",
Adam at 0.01), started from random weights; ``--config`` times another config's model,
loss and optimizer (``--config configs/quickstart.py --shapes 4x64x64``: the quickstart's
step; ``--profile`` adds the breakdown below). Each shape is timed once per
``--conv-backends`` setting (``ModelConfig.conv_backend``: XLA's convolutions or
oneDNN's) and, on a CPU, ``--ynn-fusions`` setting (``config.xla_cpu_ynn_fusions``: what
XLA hands to YNNPACK), one after the other, so the settings are compared under the
same load.

A config with a teacher (``configs/stable.py``: self-distillation from ``init_from``,
which must then be a local converted checkpoint or the cached download) times the step
as `train.py` runs it, teacher and matching term included, from the ``init_from``
weights; its forward and forward + backward columns are the student's output loss
alone. ``--train-blocks 2`` trains only those IM-blocks (``config.train_blocks``):
``--config configs/stable.py --config.init_from checkpoints/minet_its``, with and
without it, compares the two.

``--profile`` prints where one step's time goes, summed by kind of operation
(convolutions, their input and weight gradients, elementwise, reductions, ...), for each
setting timed. The figures measured so far, and what they led to, are in
docs/TRAINING.md ("Speed of a training step") and docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import op_profile  # benchmarks/op_profile.py, beside this script

import minet_jax
from minet_jax.train import checks, config_file, loop
from minet_jax.train import state as state_lib
from minet_jax.train.step import (cpu_compiler_options, loss_and_grads, make_train_step,
                                  parse_ynn_fusions, train_step)

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def median_seconds(fn, *args, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(config: ml_collections.ConfigDict, shape: tuple[int, int, int], repeats: int,
            ynn_fusions: str, profile: bool = False) -> dict[str, float]:
  """Times `config`'s forward, forward + backward and training step on random data."""
  n, h, w = shape
  rng = np.random.default_rng(0)
  batch = {"hazy": jnp.asarray(rng.random((n, h, w, 3), np.float32)),
           "clear": jnp.asarray(rng.random((n, h, w, 3), np.float32))}
  cfg = minet_jax.model_config(config.model)
  # What train.py starts from and steps with: the init_from weights and the teacher.
  try:
    state = (loop._initial_state(config, cfg) if config.init_from
             else state_lib.create_train_state(config, cfg=cfg))
    step_args = loop.step_options(config, cfg)
  except (checks.ConfigError, OSError) as e:
    raise SystemExit(f"train_step_speed: config.init_from {config.init_from!r}: {e}") from None
  graphdef, _ = nnx.split(state.merge()[0])
  key = jax.random.key(0)

  # The forward and fwd+bwd splits are compiled with the same options as the step.
  options = cpu_compiler_options(ynn_fusions)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=options)
  grads = jax.jit(lambda s, b: loss_and_grads(nnx.merge(graphdef, s), b, loss=config.loss,
                                              key=key), compiler_options=options)
  step = make_train_step(config.loss, ynn_fusions=ynn_fusions, **step_args)

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
  if profile:
    # Without donation, so the profiled program can run twice on the same state.
    undonated = jax.jit(functools.partial(train_step, loss=config.loss, **step_args),
                        compiler_options=options)
    op_profile.print_op_times(op_profile.op_times(
        undonated.lower(state, batch).compile(), state, batch))
  _, model_state = nnx.split(state.merge()[0])
  jax.block_until_ready(forward(model_state, batch["hazy"]))
  jax.block_until_ready(grads(model_state, batch))
  return {"compile_s": compile_s, "step_s": statistics.median(times),
          "forward_s": median_seconds(forward, model_state, batch["hazy"], repeats=repeats),
          "forward_backward_s": median_seconds(grads, model_state, batch, repeats=repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=["2x128x128", "8x64x64", "1x460x620"],
                      help="batch shapes N x H x W")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--config", default=str(_CONFIGS / "its_authors.py"),
                      help="training config whose model, loss and optimizer are timed")
  parser.add_argument("--ynn-fusions", nargs="+", default=["default", "dot"],
                      help="config.xla_cpu_ynn_fusions settings to time, alternately for "
                           "each shape (CPU only; default: XLA's defaults and 'dot')")
  parser.add_argument("--conv-backends", nargs="+", default=["xla", "onednn"],
                      help="config.model.conv_backend settings to time, alternately with "
                           "the --ynn-fusions ones (default: XLA's convolutions and oneDNN's)")
  parser.add_argument("--config.init_from", dest="init_from", default=None,
                      help="replaces the config's init_from (a converted checkpoint folder)")
  parser.add_argument("--train-blocks", type=int, nargs="+", default=None,
                      help="config.train_blocks: train only these IM-blocks (from 1)")
  parser.add_argument("--profile", action="store_true",
                      help="also print where a step's time goes, by kind of operation "
                           "(benchmarks/op_profile.py)")
  args = parser.parse_args()
  for setting in args.ynn_fusions:
    try:
      parse_ynn_fusions(setting)
    except ValueError as e:
      raise SystemExit(f"train_step_speed: --ynn-fusions: {e}") from None
  config = config_file.load_module(pathlib.Path(args.config)).get_config()
  with config.unlocked():
    if args.init_from is not None:
      config.init_from = args.init_from
    if args.train_blocks is not None:
      config.train_blocks = tuple(args.train_blocks)
  try:
    checks.validate_config(config)
  except checks.ConfigError as e:
    raise SystemExit(f"train_step_speed: {e}") from None
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}, "
        f"{os.cpu_count()} host cores ({platform.processor() or platform.machine()}); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  m = config.model
  print(f"{args.config}: {m.features} features, iterations {tuple(m.iterations)}, dilations "
        f"{tuple(m.dilations)}, loss {config.loss}, Adam; teacher {config.teacher or '-'}, "
        f"train_blocks {tuple(config.train_blocks) or 'all'}; seconds")
  fusions = args.ynn_fusions if jax.default_backend() == "cpu" else ["default"]
  settings = [(b, f) for b in args.conv_backends for f in fusions]
  print(f"{'batch':>10} | {'conv':>6} | {'ynn_fusions':>11} | {'forward':>8} | "
        f"{'fwd+bwd':>8} | {'step':>8} | {'compile':>8}")
  for text in args.shapes:
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 3:
      raise SystemExit(f"--shapes takes N x H x W, got {text!r}")
    for backend, ynn_fusions in settings:
      with config.unlocked():
        config.model.conv_backend = backend
      r = measure(config, shape, args.repeats, ynn_fusions, profile=args.profile)
      print(f"{text:>10} | {backend:>6} | {ynn_fusions:>11} | {r['forward_s']:8.3f} | "
            f"{r['forward_backward_s']:8.3f} | {r['step_s']:8.3f} | {r['compile_s']:8.1f}",
            flush=True)


if __name__ == "__main__":
  main()
