"""One IM-block as a two-stage implicit Runge-Kutta step: does a second stage copy better?

    python benchmarks/stable_two_stage.py --model workdirs/stable_block3 --block 2 \
        --gamma 0.3 --steps 300 --out RESULT [--init-block its] [--target 0.85] \
        [--hinge-weight 4] [--learning-rate 3e-3] [--iters 8] [--kind radius] \
        [--rooms 24] [--size 460 620] \
        [--shared ../shared] [--images 1400_1 ...] [--radius-iters 40]

A stage block (`ModelConfig.stage_fraction` s) answers g0 + eta f(k) from one solved
stage k = g0 + s eta f(k): one evaluation of f must give the whole step, where the
released block composes eight (docs/STABILITY.md, "What limits it"). This script
makes block ``--block`` of ``--model`` a two-stage block at fraction gamma
(`ModelConfig.stages`, which documents the step; `IMBlock` solves it):

    k1 = g0 + gamma eta f(k1)
    y  = c + gamma eta f(y),   c = g0 + (1 - gamma) eta f(k1)

and compares it with the one-stage block from the same start, on the same cached
renders: `configs/stable_two_stage.py` is the run users make of it (gamma 0.5, block 2),
and this script the sweep around it.

Block ``--block``'s f starts from ``--init-block`` (the released model's block by
default) and, with ``--steps`` > 0, trains like `stable_fullres.py` on whole renders
of the offline synthetic rooms: the frozen released model's block input g0 and output
y_t per render, cached once; each step minimises the matching term of the training
(`contractive.fixed_point_mismatch`: ||c + gamma eta f(y_t) - y_t||^2 / ||y_t - g0||^2,
the second stage's residual at the teacher's answer, stage 1 solved from g0 without a
gradient and entering c through one differentiated evaluation of f, as Jacobian-free
backprop) plus ``--hinge-weight`` times the radius hinge max(0, rho - ``--target``)^2
at stage 1's solution and at y_t (`contractive.block_term`; rho from ``--iters`` power
steps, differentiated as ``--kind`` says). Adam, cosine-decayed to
10 %. Only that block's f trains.

Scored on the SOTS samples at full resolution, inside ``--model`` (its other blocks, as
it stores them; `stable_minet.scores`): PSNR / SSIM, solves converged and steps per
block, the two-stage block's steps being both stages' together; with
``--radius-iters`` N (`stable_minet.theorem1`), the radius of the block's stage map at
each stage's solution (``stage_rho``: Theorem 1 for each stage), and of every later
block's at its solution (``later_rho``: the block changes their inputs).
``--gamma`` below 0 scores the one-stage block at fraction -gamma from the same start
instead (the comparison; no training).
Writes ``--out`` + ``.json`` (``training``: the per-step log, written before scoring too;
the scores; ``seconds`` in all, ``training_seconds`` to the end of training) and, after
training, ``--out`` as a checkpoint folder of the model, which `minet_jax.load`,
`dehaze` and `evaluate` run with its two-stage block. Float32 only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minet_jax import hub
from minet_jax.core import checkpoint
from minet_jax.core.config import ModelConfig
from minet_jax.core.model import MINet
from minet_jax.core.params import Params, model_from_params, params_from_model
from minet_jax.data import folders
from minet_jax.stability import contractive, spectral

from stable_fullres import (_positive, new_result_or_exit, render_set_or_exit, renders,
                            same_architecture_or_exit)
from stable_minet import DEFAULT_SHARED, scores, theorem1


def _gamma(text: str) -> float:
  value = float(text)
  try:  # The config's own checks of a fraction and a stage count; the sign picks the count.
    ModelConfig(stage_fraction=abs(value), stages=2 if value > 0 else 1)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return value


def with_block(params: Params, index: int, gamma: float) -> Params:
  """``params`` with block ``index`` at fraction |gamma|, two-stage for ``gamma`` > 0
  (`ModelConfig.stages`), one-stage otherwise."""
  fractions, stages = list(params.config.stage_fraction), list(params.config.stages)
  fractions[index], stages[index] = abs(gamma), 2 if gamma > 0 else 1
  return params.replace_config(stage_fraction=tuple(fractions), stages=tuple(stages))


def score(params: Params, index: int, pairs, radius_iters: int = 0) -> dict:
  """`stable_minet.scores` on ``pairs`` (key, hazy, clear): PSNR / SSIM, convergence and
  steps per block (both stages' for a two-stage block); with ``radius_iters`` > 0 also
  `stable_minet.theorem1` per image, kept in each row as ``stage_rho`` (block ``index``'s
  radius at each stage's solution) and ``later_rho`` (every later block's: the block
  changes their inputs)."""
  result = scores(params, pairs)
  if radius_iters:
    figures = theorem1(params, pairs, radius_iters)
    for row in result["rows"]:
      mine = [f for f in figures if f["image"] == row["image"]]
      row["stage_rho"] = mine[index].get("stage_rho", [mine[index]["rho"]])
      row["later_rho"] = [f["rho"] for f in mine[index + 1:]]
  return result


def train_block(model: MINet, teacher: Params, hazy: np.ndarray, *, index: int,
                steps: int, learning_rate: float, target: float, hinge_weight: float,
                iters: int, kind: str = "radius", seed: int = 0) -> list[dict]:
  """Trains block ``index`` of ``model`` in place as described above on ``hazy`` (float32
  [0, 1], (N, H, W, 3)); returns the per-step records (before each update)."""
  block = model.im_blocks[index]
  teacher_model = model_from_params(teacher)

  @jax.jit
  def block_states(image):
    runs = teacher_model.solve_blocks(teacher_model.model_input(image))
    return runs[index].g0, runs[index].output

  states = [block_states(jnp.asarray(image[None])) for image in hazy]
  schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1)
  optimizer = nnx.Optimizer(block, optax.adam(schedule), wrt=nnx.Param)

  @nnx.jit
  def step(block, optimizer, g0, y, key):
    def loss_fn(block):
      # Stage 1 solved once (a constant), c through one differentiated f(k1).
      points = block.stage_points(g0, y)
      mismatch = jnp.mean(contractive.fixed_point_mismatch(block, g0, y,
                                                           stage_points=points))
      keys = spectral.stage_keys(key, len(points))
      hinges, radii = zip(*(contractive.block_term(
          block, base, jax.lax.stop_gradient(g), k, kind=kind, num_iters=iters,
          target=target) for (base, g), k in zip(jax.lax.stop_gradient(points), keys)))
      return mismatch + hinge_weight * sum(hinges), (mismatch, radii[0], radii[-1])
    (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(block)
    optimizer.update(block, grads)
    return aux

  order = np.random.default_rng(seed)
  key = jax.random.key(seed)
  records = []
  for i in range(steps):
    j = int(order.integers(len(states)))
    mismatch, rho1, rho2 = jax.device_get(
        step(block, optimizer, *states[j], jax.random.fold_in(key, i)))
    records.append({"step": i, "render": j, "mismatch": float(mismatch), "rho1": float(rho1),
                    "rho2": float(rho2)})
    if i % 10 == 0 or i == steps - 1:
      recent = records[-10:]
      print(f"step {i}: mismatch {np.mean([r['mismatch'] for r in recent]):.4f}, rho max "
            f"{max(r['rho1'] for r in recent):.3f} / {max(r['rho2'] for r in recent):.3f}",
            flush=True)
  return records


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="the stable model the block sits in")
  parser.add_argument("--init-block", default="its", help="where the block's f starts "
                      "(default: the released model, which is also the teacher)")
  parser.add_argument("--teacher", default="its")
  parser.add_argument("--block", type=_positive(int), default=2, help="IM-block, from 1")
  parser.add_argument("--gamma", type=_gamma, required=True,
                      help="both stages' fraction; below 0: one stage at -gamma, untrained")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--learning-rate", type=_positive(float), default=3e-3)
  parser.add_argument("--target", type=_positive(float), default=0.85)
  parser.add_argument("--hinge-weight", type=_positive(float), default=4.0)
  parser.add_argument("--iters", type=_positive(int), default=8)
  parser.add_argument("--kind", choices=("radius", "radius_exact"), default="radius",
                      help="the radius estimate the hinge differentiates "
                           "(`ModelConfig.contractive_kind`)")
  parser.add_argument("--rooms", type=_positive(int), default=24)
  parser.add_argument("--size", type=_positive(int), nargs=2, default=(460, 620),
                      metavar=("H", "W"))
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--images", nargs="*", default=None, help="SOTS keys (default: all)")
  parser.add_argument("--radius-iters", type=int, default=0,
                      help="> 0: the block's stage radii on each image, this many power steps")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  if args.radius_iters < 0:
    parser.error(f"--radius-iters must be >= 0, got {args.radius_iters}")
  if args.steps < 0 or (args.steps and args.gamma < 0):
    parser.error("--steps must be >= 0, and 0 for the one-stage comparison (--gamma < 0)")
  # stable_fullres.py's renders at its default exposure and seed.
  data = render_set_or_exit(parser, args.rooms, args.size, (1.5, 3.0), 7, "--size / --rooms")
  log_path = new_result_or_exit(parser, args.out)
  try:
    base, start = hub.resolve(args.model), hub.resolve(args.init_block)
    teacher = hub.resolve(args.teacher) if args.steps else None
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.block > base.config.num_blocks:
    parser.error(f"--block {args.block}: the model has {base.config.num_blocks} IM-blocks")
  if base.config.dtype != "float32":
    parser.error(f"--model computes in {base.config.dtype}; this script runs float32 only")
  same_architecture_or_exit(parser, base, "--model",
                            {"--init-block": start, "--teacher": teacher})
  records = folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
  if args.images:
    missing = set(args.images) - {r.key for r in records}
    if missing:
      parser.error(f"--images: no SOTS sample {', '.join(sorted(missing))}")
    records = [r for r in records if r.key in args.images]
  if not records:
    parser.error(f"no SOTS samples under {args.shared}")

  began = time.perf_counter()
  index = args.block - 1
  model = model_from_params(with_block(base, index, args.gamma))
  nnx.update(model.im_blocks[index].f, nnx.state(model_from_params(start).im_blocks[index].f))
  log = []
  if args.steps:
    hazy = renders(data).astype(np.float32) / 255.0
    print(f"{len(hazy)} renders at {args.size[0]} x {args.size[1]}", flush=True)
    log = train_block(model, teacher, hazy, index=index, steps=args.steps,
                      learning_rate=args.learning_rate, target=args.target,
                      hinge_weight=args.hinge_weight, iters=args.iters, kind=args.kind)
    checkpoint.save(params_from_model(model), args.out)
  settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
  trained = time.perf_counter() - began
  # The training log is written before scoring, so a failure there does not lose it.
  log_path.write_text(json.dumps({"args": settings, "training_seconds": trained,
                                  "training": log}, indent=1) + "\n")
  pairs = [(r.key, *folders.load_pair(r)) for r in records]
  result = score(params_from_model(model), index, pairs, args.radius_iters)
  result.update(args=settings, training_seconds=trained, seconds=time.perf_counter() - began,
                training=log)
  log_path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"{result['psnr']:.3f} dB / {result['ssim']:.5f}, converged {result['converged']}/"
        f"{result['solves']}, mean steps {np.round(result['mean_steps'], 1).tolist()}; "
        f"wrote {log_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
