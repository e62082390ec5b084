"""Contraction by surgery: shrink only the channels that carry each IM-block's expanding mode.

    python benchmarks/stable_surgery.py --out runs/surgery [--target 0.7] [--rounds 12]
        [--shared ../shared] [--eval-images 1400_1 ...]

Starts from the authors' released weights, blocks solved by Picard to rtol 1e-3
(best-so-far answers, at most ``--cap`` steps). Block by block (1, 2, 3), each round:

1. solve the model on the training images (the RESIDE ITS samples of ``../shared``:
   the four hazy images and the two clear ones; never SOTS, the test set) and, at the
   block's solution, find the dominant eigenvalue of eta * df/dg and its right and
   left eigenvectors v, u (``--power`` steps of power iteration with jvps / vjps);
2. stop the block when every image has rho < ``--target``;
3. otherwise split the eigenvalue over the output channels c of f: by first-order
   perturbation, scaling channel c of f by s_c changes lambda by
   -lambda (1 - s_c) share_c, share_c = <u_c, v_c> / <u, v>. For each image above the
   target, take the channels holding 70 % of the positive share and shrink them
   equally so that lambda would fall to the target (at most by half per round);
   f ends in relu(IN(.) * scale + bias), so channel c is scaled exactly by scaling
   its scale and bias in the block's last norm.

The channels left alone keep the released weights, so only the expanding directions
lose amplitude (a uniform shrink of f, `--shrink` in stable_minet.py, scales all of them).
Writes the log of every round, the contracted checkpoint (``OUT/ckpt``, the stored
solver Picard to rtol 1e-3, at most 30 steps) and its SOTS scores (``OUT/sots.json``;
`stable_minet.py --stable OUT/ckpt` measures it fully).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from minet_jax import convert
from minet_jax.core.params import Params, model_from_params
from minet_jax.core import checkpoint
from minet_jax.data import folders
from minet_jax.stability import spectral
from minet_jax.train.state import shrink_blocks

import stable_minet  # benchmarks/stable_minet.py: the SOTS scoring, shared


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", type=pathlib.Path, default=pathlib.Path(
      os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")))
  p.add_argument("--target", type=float, default=0.7)
  p.add_argument("--rounds", type=int, default=12)
  p.add_argument("--floor", type=float, default=0.3)
  p.add_argument("--blocks", default="0,1,2")
  p.add_argument("--start", default="1,1,1")
  p.add_argument("--power", type=int, default=60)
  p.add_argument("--cap", type=int, default=50)
  p.add_argument("--eval-images", nargs="*", default=None)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
  shared = a.shared
  released = convert.weights_from_checkpoint(shared / "weights/minet_its_official.pth")
  params = shrink_blocks(released, tuple(float(s) for s in a.start.split(",")))
  params = Params(params.weights, dataclasses.replace(params.config, solver="picard", rtol=1e-3,
                  iterations=(a.cap,) * released.config.num_blocks, best_so_far=True))
  xs = [jnp.asarray(im[None]) for im in stable_minet.its_images(shared)]
  num_blocks, channels = params.config.num_blocks, params.config.features
  log = []

  @functools.partial(jax.jit, static_argnums=0)
  def eigen(block_def, block_state, g0, g, key):
    """rho at g (geometric mean of the last two power ratios, which a 2-cycle needs) and
    the per-channel overlap <u_c, v_c> of the dominant right and left eigenvectors."""
    t_map, f_state = nnx.merge(block_def, block_state).map_fn()
    matvec, rmatvec = spectral.linearise(lambda z: t_map(z, (g0, f_state)), g)
    k1, k2 = jax.random.split(key)
    right = spectral.spectral_radius(matvec, jax.random.normal(k1, g.shape),
                                     num_iters=a.power, window=2)
    left = spectral.spectral_radius(rmatvec, jax.random.normal(k2, g.shape),
                                    num_iters=a.power, window=2)
    return right["radius"], jnp.sum(left["vector"] * right["vector"], axis=(0, 1, 2))

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def points(graphdef, b, state, x):
    model = nnx.merge(graphdef, state)
    run = model.solve_blocks(model.model_input(x))[b]
    return run.g0, run.result.value, run.result.num_steps

  for b in [int(i) for i in a.blocks.split(",")]:
    for rnd in range(a.rounds):
      model = model_from_params(params)
      gd, st = nnx.split(model)
      bdef, bst = nnx.split(model.im_blocks[b])
      rhos, shares, steps = [], [], []
      for i, x in enumerate(xs):
        g0, g, n = points(gd, b, st, x)
        rho, ov = eigen(bdef, bst, g0, g, jax.random.key(i))
        rhos.append(float(rho)); steps.append(int(n[0]))
        ov = np.asarray(ov); shares.append(ov / ov.sum())
      rec = {"block": b + 1, "round": rnd, "rho": rhos, "steps": steps}
      print(rec, flush=True)
      if max(rhos) < a.target:
        break
      # First-order: d lambda / lambda = -(1 - s_c) * share_c; aim each bad image at target.
      need = np.zeros(channels)
      for rho, sh in zip(rhos, shares):
        if rho >= a.target:
          frac = 1 - a.target / rho
          pos = np.clip(sh, 0, None)
          order = np.argsort(-pos)
          top = order[:int(np.searchsorted(np.cumsum(pos[order]), 0.7 * pos.sum())) + 1]
          k = frac / max(float(sh[top].sum()), 1e-3)
          need[top] = np.maximum(need[top], k)
      factors = np.clip(1 - np.minimum(need, 0.5), a.floor, 1.0)
      norm = params.weights["im_blocks"][str(b)]["f"]["norm2"]
      weights = jax.tree.map(lambda x: x, params.weights)
      weights["im_blocks"][str(b)]["f"]["norm2"] = {k: v * jnp.asarray(factors, v.dtype) for k, v in norm.items()}
      params = Params(weights, params.config)
      rec["factors"] = {int(c): round(float(factors[c]), 3) for c in np.nonzero(factors < 1)[0]}
      print("  shrink", rec["factors"], flush=True)
      log.append(rec)
      (out / "log.json").write_text(json.dumps(log, indent=1))

  total = {str(b): np.asarray(params.weights["im_blocks"][str(b)]["f"]["norm2"]["scale"]).tolist() for b in range(num_blocks)}
  (out / "scales.json").write_text(json.dumps(total))
  final = Params(params.weights, dataclasses.replace(params.config, iterations=(30,) * num_blocks))
  checkpoint.save(final, out / "ckpt", overwrite=True)
  pairs = [(r.key, *folders.load_pair(r)) for r in folders.find_sots_pairs(shared / "data/RESIDE/SOTS/indoor")]
  if a.eval_images:
    pairs = [q for q in pairs if q[0] in a.eval_images]
  sc = stable_minet.scores(final, pairs); sc.pop("rows")
  print("SOTS", sc, flush=True)
  (out / "sots.json").write_text(json.dumps(sc, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
