"""Can the layers after the IM-blocks make up for contractive blocks? A measurement.

    python benchmarks/stable_decoder.py [--shared ../shared] [--shrink 0.3 0.3 0.3]
        [--steps 400] [--lr 3e-4] [--out docs/stability/stable_decoder.json]

The student is the released model with each IM-block's f scaled (`shrink_blocks`),
its blocks solved by Picard to rtol 1e-3 (at most 30 steps, best-so-far answers).
The encoder and the blocks stay frozen, so the blocks stay what the scaling made them;
only the MLF gate, the decoder and the tail are trained, to reproduce the frozen
released model's output (T = 8 unrolled). Because nothing before the fusion trains,
every input's block solutions are computed once and cached, and a training step is
the decoder's forward and backward pass alone.

Inputs: the four ITS sample hazy images of ``../shared`` at full size (620x460) and
their mirror images, one per step, plus a batch of the offline synthetic train split
(144x192); never the SOTS images, the test set. Scored: PSNR to the teacher's output
on the synthetic validation split and on the ITS inputs every ``--eval-every`` steps,
and PSNR / SSIM to the ground truth on the 10 SOTS samples at the end, with the count
of converged solves. Prints each figure and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minet_jax import convert
from minet_jax.core.params import Params, model_from_params, params_from_model
from minet_jax.data import folders, synthetic
from minet_jax.train.state import shrink_blocks

import stable_minet  # benchmarks/stable_minet.py: the SOTS scoring, shared

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
# What the fusion, decoder and tail own (`MINet.stages`: "fusion", "decoder", "tail").
TRAINED = ("gate", "deconv3", "norm4", "deconv2", "norm5", "deconv1", "conv_su1",
           "conv_su2", "layer1", "deconv")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--shrink", nargs=3, type=float, default=[0.3, 0.3, 0.3])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--lr", type=float, default=3e-4, help="Adam, cosine-decayed to 10%%")
  parser.add_argument("--synthetic-batch", type=int, default=4)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  report: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                  "devices": str(jax.devices()[0]), "curve": []}

  released = convert.weights_from_checkpoint(args.shared / "weights/minet_its_official.pth")
  student = shrink_blocks(released, tuple(args.shrink))
  student = Params(student.weights, dataclasses.replace(
      student.config, solver="picard", rtol=1e-3, iterations=(30,) * 3, best_so_far=True))
  teacher_graph, teacher_state = nnx.split(model_from_params(released))
  graph, state = nnx.split(model_from_params(student))

  @jax.jit
  def cached_inputs(x):
    """What the trained layers see for `x`: block solutions, model image, the target."""
    model = nnx.merge(graph, state)
    image = model.model_input(x)
    states = [run.result.value for run in model.solve_blocks(image)]
    return states, image, nnx.merge(teacher_graph, teacher_state)(x)

  def cache(batches):
    return [cached_inputs(jnp.asarray(x)) for x in batches]

  its = [folders.load_pair(r)[0].astype(np.float32) / 255.0
         for r in folders.find_its_pairs(args.shared / "data/RESIDE/ITS")]
  its_rows = cache([im[None] for im in its + [im[:, ::-1] for im in its]])

  def synthetic_batches(split, size):
    images = [np.asarray(e["hazy"], np.float32) / 255.0 for e in synthetic.generate(split)]
    return [np.stack(images[i:i + size]) for i in range(0, len(images) - size + 1, size)]

  train_rows = cache(synthetic_batches("train", args.synthetic_batch))
  val_rows = cache(synthetic_batches("validation", 4))

  def output(params, row):
    states, image, target = row
    model = nnx.merge(graph, params)
    return model.output_from_states(states, image, image.shape[1:3]), target

  def psnr_to_teacher(params, rows):
    values = []
    for row in rows:
      y, target = output(params, row)
      mse = jnp.mean(jnp.square(jnp.clip(y, 0, 1) - jnp.clip(target, 0, 1)), axis=(1, 2, 3))
      values.extend(np.asarray(-10 * jnp.log10(mse)).tolist())
    return float(np.mean(values))

  params = state  # The whole state, so the model merges from it inside the step.
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], "key", None) in TRAINED, params)
  tx = optax.masked(optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, 0.1)), mask)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, its_row, synthetic_row):
    def loss(params):
      return sum(jnp.mean(jnp.square(y - t))
                 for y, t in (output(params, its_row), output(params, synthetic_row)))
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def record(step):
    row = {"step": step, "synthetic_val_to_teacher": psnr_to_teacher(params, val_rows),
           "its_to_teacher": psnr_to_teacher(params, its_rows)}
    report["curve"].append(row)
    print(row, flush=True)

  record(0)
  rng, start = np.random.default_rng(0), time.perf_counter()
  for step in range(1, args.steps + 1):
    params, opt_state, _ = train_step(params, opt_state, its_rows[rng.integers(len(its_rows))],
                                      train_rows[rng.integers(len(train_rows))])
    if step % args.eval_every == 0 or step == args.steps:
      record(step)
  report["train_seconds"] = time.perf_counter() - start

  pairs = [(r.key, *folders.load_pair(r))
           for r in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")]
  sots = stable_minet.scores(params_from_model(nnx.merge(graph, params)), pairs)
  report["sots"] = {"psnr": sots["psnr"], "ssim": sots["ssim"],
                    "converged": sots["converged"], "solves": sots["solves"]}
  print("SOTS", report["sots"], flush=True)
  if args.out:
    args.out.write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
