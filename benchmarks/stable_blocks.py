"""Block-wise self-distillation towards contraction: each IM-block's f learns to have the
released model's block output as its fixed point, with a hinge on its spectral radius.

    python benchmarks/stable_blocks.py --out runs/blocks [--shrink 0.3,1,1] [--train 1,2]
        [--target 0.5] [--weight 1] [--lr 1e-3] [--steps 500] [--power 4]

No solve in training: block i's loss, on the RESIDE ITS samples of ``../shared`` (the
four hazy images and the two clear ones, and their mirror images; never SOTS), is

    ||T_i(g_t) - g_t||^2 / ||g_t - g0||^2 + weight * max(0, rho_i - target)^2,

T_i(g) = g0 + eta f_i(g), g_t the teacher's (released, T = 8 unrolled) block output and
g0 the block's input: the teacher's, or for block 2 with ``--student-input`` (the
default) the student's own block-1 solution, which the frozen, ``--shrink``-scaled
block 1 gives. rho_i = ||eta J v|| at g_t for a power-iteration vector v kept per image
and block across steps (``--power`` more jvp steps each time it is visited), as
spectral normalisation keeps its vector, so the estimate sharpens as training goes.
Only the blocks in ``--train`` (zero-based) learn; Adam, cosine-decayed to 10 %.
Writes a log line per step, the checkpoint (``OUT/ckpt``: Picard to rtol 1e-3, at most
30 steps, best-so-far) and its SOTS scores (``OUT/sots.json``).
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
from minet_jax.core import checkpoint
from minet_jax.data import folders, synthetic
from minet_jax.stability import contractive, spectral
from minet_jax.train.state import shrink_blocks

import stable_minet  # benchmarks/stable_minet.py: the SOTS scoring, shared


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", type=pathlib.Path, default=pathlib.Path(
      os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")))
  p.add_argument("--shrink", default="0.3,1,1")
  p.add_argument("--train", default="1,2")  # zero-based blocks
  p.add_argument("--target", type=float, default=0.5)
  p.add_argument("--weight", type=float, default=1.0)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--power", type=int, default=3)
  p.add_argument("--synthetic", type=int, default=0)
  p.add_argument("--student-input", action=argparse.BooleanOptionalAction, default=True,
                 help="block 2 learns from the student's block-1 solution, not the teacher's")
  p.add_argument("--eval-images", nargs="*", default=None)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
  shared = pathlib.Path(a.shared)
  shrink = tuple(float(s) for s in a.shrink.split(","))
  train_blocks = [int(i) for i in a.train.split(",")]

  released = convert.weights_from_checkpoint(shared / "weights/minet_its_official.pth")
  student = shrink_blocks(released, shrink)
  student = Params(student.weights, dataclasses.replace(student.config, solver="picard", rtol=1e-3,
                   iterations=(30,) * released.config.num_blocks,
                   best_so_far=True))
  tgraph, tstate = nnx.split(model_from_params(released))

  @jax.jit
  def teacher_states(x):
    m = nnx.merge(tgraph, tstate)
    runs = m.solve_blocks(m.model_input(x))
    return [(r.g0, r.result.value) for r in runs]

  imgs = stable_minet.its_images(shared)
  imgs += [im[:, ::-1] for im in imgs]
  sgraph0, sstate0 = nnx.split(model_from_params(student))

  @jax.jit
  def student_block1(x):
    m = nnx.merge(sgraph0, sstate0)
    g0 = m.encode(m.model_input(x))
    return m.im_blocks[0](g0)

  def cache_row(x):
    row = teacher_states(x)
    if a.student_input:
      row = [row[0], (student_block1(x), row[1][1]), row[2]]
    return row

  if a.synthetic:
    imgs += [np.asarray(e["hazy"], np.float32) / 255 for e in synthetic.generate("train")][:a.synthetic]
  rows = [cache_row(jnp.asarray(im[None])) for im in imgs]
  print("cached", len(rows), "rows", flush=True)

  model = model_from_params(student)
  graph, state = nnx.split(model)
  blocks_def = [nnx.split(b) for b in model.im_blocks]

  def block_loss(bparams, bi, g0, gt, v):
    bdef = blocks_def[bi][0]
    block = nnx.merge(bdef, bparams)
    mism = jnp.mean(contractive.fixed_point_mismatch(block, g0, gt))
    rho, v = contractive.block_radius_from(block, g0, gt, v, a.power)
    rho = jnp.mean(rho)
    pen = jnp.square(jax.nn.relu(rho - a.target))
    return mism + a.weight * pen, (mism, rho, v)

  bparams = {bi: blocks_def[bi][1] for bi in train_blocks}
  tx = optax.adam(optax.cosine_decay_schedule(a.lr, a.steps, 0.1))
  opt = tx.init(bparams)

  @jax.jit
  def step(bparams, opt, row, vs):
    def loss(bp):
      total, aux = 0.0, {}
      for bi in train_blocks:
        g0, gt = row[bi]
        l, (m, r, v) = block_loss(bp[bi], bi, g0, gt, vs[bi])
        total = total + l
        aux[bi] = (m, r, v)
      return total, aux
    (l, aux), g = jax.value_and_grad(loss, has_aux=True)(bparams)
    u, opt = tx.update(g, opt, bparams)
    return optax.apply_updates(bparams, u), opt, l, aux

  key = jax.random.key(0)
  vecs = []
  for i, row in enumerate(rows):
    d = {}
    for bi in train_blocks:
      gt = row[bi][1]
      d[bi] = spectral.unit(jax.random.normal(jax.random.fold_in(key, 10 * i + bi), gt.shape), per_sample=True)
    vecs.append(d)
  log = open(out / "log.jsonl", "w")
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for s in range(1, a.steps + 1):
    i = int(rng.integers(len(rows)))
    bparams, opt, l, aux = step(bparams, opt, rows[i], vecs[i])
    vecs[i] = {bi: aux[bi][2] for bi in train_blocks}
    rec = {"step": s, "img": i, "loss": float(l), "t": time.perf_counter() - t0,
           **{f"m{bi+1}": float(aux[bi][0]) for bi in train_blocks},
           **{f"rho{bi+1}": float(aux[bi][1]) for bi in train_blocks}}
    log.write(json.dumps(rec) + "\n"); log.flush()
    if s % 10 == 0 or s == 1:
      print(rec, flush=True)

  for bi in train_blocks:
    nnx.update(model.im_blocks[bi], bparams[bi])
  final = params_from_model(model)
  checkpoint.save(final, out / "ckpt", overwrite=True)
  pairs = [(r.key, *folders.load_pair(r)) for r in folders.find_sots_pairs(shared / "data/RESIDE/SOTS/indoor")]
  if a.eval_images:
    pairs = [q for q in pairs if q[0] in a.eval_images]
  sc = stable_minet.scores(final, pairs)
  sc.pop("rows")
  print("SOTS", sc, flush=True)
  (out / "sots.json").write_text(json.dumps(sc, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
