"""One IM-block as a two-stage implicit Runge-Kutta step: does a second stage copy better?

    python benchmarks/stable_two_stage.py --model workdirs/stable_block3 --block 2 \
        --gamma 0.3 --steps 300 --out RESULT [--init-block its] [--target 0.85] \
        [--hinge-weight 4] [--learning-rate 3e-3] [--rooms 24] [--size 460 620] \
        [--shared ../shared] [--images 1400_1 ...] [--radius-iters 40]

A stage block (`ModelConfig.stage_fraction` s) answers g0 + eta f(k) from one solved
stage k = g0 + s eta f(k): one evaluation of f must give the whole step, where the
released block composes eight (docs/STABILITY.md, "What limits it"). This script
gives block ``--block`` of ``--model`` two stages of a singly diagonally implicit
Runge-Kutta step (SDIRK, stiffly accurate, both stages solved with the same f and
fraction gamma):

    k1 = g0 + gamma eta f(k1)
    y  = c + gamma eta f(y),   c = g0 + (1 - gamma) eta f(k1) = g0 + (1 - gamma) / gamma (k1 - g0)

Both stages are fixed points of the model's own stage map T(g; base) = base + gamma eta
f(g) (`IMBlock.map_fn`, the block at fraction gamma), solved by the model's solver
(`fixed_point.fixed_point`); the second starts from g0 + (k1 - g0) / gamma, the one-stage
answer, and y is the block's answer. Both stage maps have the Jacobian gamma eta df/dg.

Block ``--block``'s f starts from ``--init-block`` (the released model's block by
default) and, with ``--steps`` > 0, trains like `stable_fullres.py` on whole renders
of the offline synthetic rooms: the frozen released model's block input g0 and output
y_t per render, cached once; each step solves stage 1 from g0 (no gradient through the
solve; its stage enters c through one differentiated evaluation of f, as Jacobian-free
backprop) and minimises ||c + gamma eta f(y_t) - y_t||^2 / ||y_t - g0||^2, the second
stage's residual at the teacher's answer, plus ``--hinge-weight`` times the radius
hinge max(0, rho - ``--target``)^2 at stage 1's solution and at y_t
(`contractive.block_term`). Adam, cosine-decayed to 10 %. Only that block's f trains.

Scored on the SOTS samples at full resolution, inside ``--model`` (its other blocks, as
it stores them): PSNR / SSIM, solves converged and steps per block, the two-stage
block's steps being both stages' together; with ``--radius-iters`` N, the radius of the
block's stage map at each stage's solution (Theorem 1 for each stage), and of every
later block's at its solution (``later_rho``: the block changes their inputs).
``--gamma`` below 0 scores the one-stage block at fraction -gamma from the same start
instead (the comparison; no training).
Writes ``--out`` + ``.json`` (``training``: the per-step log, written before scoring too;
the scores; ``seconds`` in all, ``training_seconds`` to the end of training) and, after
training, ``--out`` as a checkpoint folder of the weights. Nothing in that checkpoint
marks the block as two-stage: `minet_jax.load`, `dehaze` and `evaluate` run it as a
one-stage block at fraction gamma, so it is for this script's ``--init-block``, not for
users. Float32 only: the second stage's start divides k1 - g0 by gamma.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minet_jax import hub, metrics
from minet_jax.core import checkpoint
from minet_jax.core import fixed_point as fp
from minet_jax.core.config import ModelConfig
from minet_jax.core.model import IMBlock, MINet
from minet_jax.core.params import Params, model_from_params, params_from_model
from minet_jax.data import folders
from minet_jax.stability import contractive, spectral

from stable_fullres import (_positive, new_result_or_exit, render_set_or_exit, renders,
                            same_architecture_or_exit)
from stable_minet import DEFAULT_SHARED


def _gamma(text: str) -> float:
  value = float(text)
  try:  # The config's own check of a fraction; the sign picks the comparison.
    ModelConfig(stage_fraction=abs(value))
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return value


def second_base(g0: jax.Array, k1: jax.Array, gamma: float) -> jax.Array:
  """The second stage's base c = g0 + (1 - gamma) eta f(k1), as g0 + (1 - gamma) / gamma
  (k1 - g0) from stage 1's solution k1 (or from T(k1), which equals it there)."""
  return g0 + ((1.0 - gamma) / gamma) * (k1 - g0)


def two_stage_solve(block: IMBlock, g0: jax.Array, gamma: float
                    ) -> tuple[fp.FixedPointResult, fp.FixedPointResult]:
  """Both stages' solves (above) of ``block`` (at stage fraction ``gamma``) from ``g0``;
  the second's ``value`` is the block's answer."""
  t_map, state = block.map_fn()
  first = fp.fixed_point(t_map, block.solver, g0, (g0, state), max_steps=block.iterations,
                         adjoint=block.adjoint, per_sample=True)
  k1 = first.value
  second = fp.fixed_point(t_map, block.solver, g0 + (k1 - g0) / gamma,
                          (second_base(g0, k1, gamma), state), max_steps=block.iterations,
                          adjoint=block.adjoint, per_sample=True)
  return first, second


class BlockSolve(NamedTuple):
  """One IM-block of `solve_blocks`."""
  output: jax.Array  # Its answer, the next block's input.
  num_steps: jax.Array  # Map evaluations, both stages' for the two-stage block.
  status: jax.Array  # The worse of its solves' `fixed_point.RESULTS`.
  solved: list[tuple[jax.Array, jax.Array]]  # Per solve: (the map's base, its solution).


def solve_blocks(m: MINet, image: jax.Array, index: int, gamma: float) -> list[BlockSolve]:
  """`MINet.solve_blocks` with block ``index`` two-stage (one-stage for ``gamma`` < 0),
  from the model-space ``image``."""
  g0, blocks = m.encode(image), []
  for i, block in enumerate(m.im_blocks):
    if i == index and gamma > 0:
      first, second = two_stage_solve(block, g0, gamma)
      blocks.append(BlockSolve(second.value, first.num_steps + second.num_steps,
                               jnp.maximum(first.status, second.status),
                               [(g0, first.value),
                                (second_base(g0, first.value, gamma), second.value)]))
    else:
      result = block.solve(g0)
      blocks.append(BlockSolve(block.output(g0, result.value), result.num_steps,
                               result.status, [(g0, result.value)]))
    g0 = blocks[-1].output
  return blocks


def forward(model: MINet, index: int, gamma: float):
  """A jitted forward pass with block ``index`` two-stage (one-stage for ``gamma`` < 0):
  clipped RGB [0, 1] and per block (map evaluations, status)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, rgb):
    m = nnx.merge(graphdef, state)
    image = m.model_input(rgb)
    blocks = solve_blocks(m, image, index, gamma)
    y = m.output_from_states([b.output for b in blocks], image, rgb.shape[1:3])
    return jnp.clip(y, 0.0, 1.0), [(b.num_steps, b.status) for b in blocks]

  return lambda rgb: run(state, rgb)


def stage_radii(model: MINet, index: int, gamma: float, radius_iters: int):
  """rho of block ``index``'s stage map at each stage's solution (stage 1, then stage 2;
  one figure for the one-stage block, ``gamma`` < 0), then of every later block's
  (whose inputs the block changes) at its solution, as `stable_minet.py` measures a
  block: the larger of the power-iteration growth rate over the last third of
  ``radius_iters`` steps and the outer Ritz value of 20 Arnoldi steps. Returns
  ``run(rgb, seed) -> (the block's radii, the later blocks' radii)``."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def points(state, rgb):
    m = nnx.merge(graphdef, state)
    blocks = solve_blocks(m, m.model_input(rgb), index, gamma)
    return blocks[index].solved, [b.solved[0] for b in blocks[index + 1:]]

  @functools.partial(jax.jit, static_argnums=0)
  def figures(block_index, state, base, point, key):
    t_map, f_state = nnx.merge(graphdef, state).im_blocks[block_index].map_fn()
    matvec, _ = spectral.linearise(lambda z: t_map(z, (base, f_state)), point)
    power_key, arnoldi_key = jax.random.split(key)
    radius = spectral.spectral_radius(matvec, jax.random.normal(power_key, point.shape),
                                      num_iters=radius_iters,
                                      window=max(radius_iters // 3, 1))
    return radius["radius"], spectral.arnoldi(
        matvec, jax.random.normal(arnoldi_key, point.shape), num_iters=20)

  def rho(block_index, base, point, key):
    radius, hess = jax.device_get(figures(block_index, state, base, point, key))
    return max(float(np.ravel(radius)[0]), spectral.ritz_summary(hess)["radius"])

  def run(rgb, seed):
    own, later = points(state, rgb)
    keys = iter(jax.random.split(jax.random.key(seed), len(own) + len(later)))
    return ([rho(index, base, point, next(keys)) for base, point in own],
            [rho(index + 1 + j, base, point, next(keys)) for j, (base, point) in enumerate(later)])
  return run


def score(model: MINet, index: int, gamma: float, pairs, radius_iters: int = 0) -> dict:
  """PSNR / SSIM, convergence and steps per block on ``pairs`` (key, hazy, clear), and
  with ``radius_iters`` > 0 the block's stage radii (`stage_radii`) on each."""
  run = forward(model, index, gamma)
  radii = stage_radii(model, index, gamma, radius_iters) if radius_iters else None
  rows = []
  for i, (key, hazy, gt) in enumerate(pairs):
    rgb = jnp.asarray(hazy[None], jnp.float32) / 255.0
    y, diagnostics = jax.device_get(run(rgb))
    psnr, ssim = metrics.dehazing_scores(y[0] * 255.0, gt.astype(np.float32))
    rows.append({"image": key, "psnr": psnr, "ssim": ssim,
                 "steps": [int(n[0]) for n, _ in diagnostics],
                 "converged": [bool(s[0] == 0) for _, s in diagnostics]})
    if radii is not None:
      rows[-1]["stage_rho"], rows[-1]["later_rho"] = radii(rgb, i)
    print(f"  {key:<8} {psnr:7.3f} dB {ssim:.5f} steps {rows[-1]['steps']}"
          + (f" rho {np.round(rows[-1]['stage_rho'], 3).tolist()}, later blocks "
             f"{np.round(rows[-1]['later_rho'], 3).tolist()}" if radii else ""), flush=True)
  steps = np.array([r["steps"] for r in rows], np.float64)
  return {"psnr": float(np.mean([r["psnr"] for r in rows])),
          "ssim": float(np.mean([r["ssim"] for r in rows])),
          "converged": int(sum(sum(r["converged"]) for r in rows)), "solves": int(steps.size),
          "mean_steps": steps.mean(axis=0).tolist(), "rows": rows}


def train_block(model: MINet, teacher: Params, hazy: np.ndarray, *, index: int, gamma: float,
                steps: int, learning_rate: float, target: float, hinge_weight: float,
                iters: int, seed: int = 0) -> list[dict]:
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
      t_map, state = block.map_fn()
      first = fp.fixed_point(t_map, block.solver, g0, (g0, jax.lax.stop_gradient(state)),
                             max_steps=block.iterations, per_sample=True)
      k1 = jax.lax.stop_gradient(first.value)
      base = second_base(g0, t_map(k1, (g0, state)), gamma)  # f(k1) differentiated
      residual = spectral.norm(t_map(y, (base, state)) - y, per_sample=True)
      size = spectral.norm(y - g0, per_sample=True)
      mismatch = jnp.mean(jnp.square(residual) / jnp.maximum(jnp.square(size), 1e-30))
      first_key, second_key = jax.random.split(key)
      # The stage map's Jacobian does not depend on its base: g0 stands for c.
      hinge1, rho1 = contractive.block_term(block, g0, k1, first_key, kind="radius",
                                            num_iters=iters, target=target)
      hinge2, rho2 = contractive.block_term(block, base, y, second_key, kind="radius",
                                            num_iters=iters, target=target)
      return mismatch + hinge_weight * (hinge1 + hinge2), (mismatch, rho1, rho2,
                                                           first.num_steps[0])
    (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(block)
    optimizer.update(block, grads)
    return aux

  order = np.random.default_rng(seed)
  key = jax.random.key(seed)
  records = []
  for i in range(steps):
    j = int(order.integers(len(states)))
    mismatch, rho1, rho2, first_steps = jax.device_get(
        step(block, optimizer, *states[j], jax.random.fold_in(key, i)))
    records.append({"step": i, "render": j, "mismatch": float(mismatch), "rho1": float(rho1),
                    "rho2": float(rho2), "stage1_steps": int(first_steps)})
    if i % 10 == 0 or i == steps - 1:
      recent = records[-10:]
      print(f"step {i}: mismatch {np.mean([r['mismatch'] for r in recent]):.4f}, rho max "
            f"{max(r['rho1'] for r in recent):.3f} / {max(r['rho2'] for r in recent):.3f}, "
            f"stage 1 steps {np.mean([r['stage1_steps'] for r in recent]):.1f}", flush=True)
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
  fractions = list(base.config.stage_fraction)
  fractions[index] = abs(args.gamma)
  model = model_from_params(base.replace_config(stage_fraction=tuple(fractions)))
  nnx.update(model.im_blocks[index].f, nnx.state(model_from_params(start).im_blocks[index].f))
  log = []
  if args.steps:
    hazy = renders(data).astype(np.float32) / 255.0
    print(f"{len(hazy)} renders at {args.size[0]} x {args.size[1]}", flush=True)
    log = train_block(model, teacher, hazy, index=index, gamma=args.gamma, steps=args.steps,
                      learning_rate=args.learning_rate, target=args.target,
                      hinge_weight=args.hinge_weight, iters=args.iters)
    checkpoint.save(params_from_model(model), args.out)
  settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
  trained = time.perf_counter() - began
  # The training log is written before scoring, so a failure there does not lose it.
  log_path.write_text(json.dumps({"args": settings, "training_seconds": trained,
                                  "training": log}, indent=1) + "\n")
  pairs = [(r.key, *folders.load_pair(r)) for r in records]
  result = score(model, index, args.gamma, pairs, args.radius_iters)
  result.update(args=settings, training_seconds=trained, seconds=time.perf_counter() - began,
                training=log)
  log_path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"{result['psnr']:.3f} dB / {result['ssim']:.5f}, converged {result['converged']}/"
        f"{result['solves']}, mean steps {np.round(result['mean_steps'], 1).tolist()}; "
        f"wrote {log_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
