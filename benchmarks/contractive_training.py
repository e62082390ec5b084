"""Does the contractivity penalty make the IM-blocks solvable? A small CPU experiment.

    python benchmarks/contractive_training.py [--shared ../shared] [--steps 400]
        [--weights 0 1] [--out docs/stability/contractive.json]

Trains the same small MI-Net (16 features, one residual block, T = 8 unrolled, as the
released model is trained) from the same initialisation on random 64x64 crops of the
RESIDE ITS sample pairs, once per penalty weight (`minet_jax.stability.contractive`, 0 = off),
then evaluates every trained model on 128x128 centre crops of the 10 SOTS indoor
samples. With ``--init released`` the authors' released model is fine-tuned instead
(and evaluated untouched as a reference row). Evaluation:

* PSNR with the training-time solver (unrolled, T = 8);
* Picard and Anderson to rtol 1e-4 (at most 100 steps): how many (image, block)
  solves converge, the steps they take, and the PSNR of the solution;
* Theorem 1 on one crop (`minet_jax.stability.analyse_image`): spectral radius and
  norm of eta*df/dg per block.

Takes a few minutes on two CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import minet_jax
from minet_jax.core import params as params_lib
from minet_jax.stability import contractive
from minet_jax import convert, image_io, metrics, stability
from minet_jax.data import folders

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
EVAL_RTOL = 1e-4
EVAL_CAP = 100


def load_pairs(records):
  pairs = [folders.load_pair(r) for r in records]
  return [(h.astype(np.float32) / 255.0, c.astype(np.float32) / 255.0) for h, c in pairs]


def random_batch(pairs, rng, batch, size):
  hazy, clear = [], []
  for _ in range(batch):
    h, c = pairs[rng.integers(len(pairs))]
    top = rng.integers(h.shape[0] - size + 1)
    left = rng.integers(h.shape[1] - size + 1)
    flip = rng.random() < 0.5
    hh, cc = h[top:top + size, left:left + size], c[top:top + size, left:left + size]
    hazy.append(hh[:, ::-1] if flip else hh)
    clear.append(cc[:, ::-1] if flip else cc)
  return jnp.asarray(np.stack(hazy)), jnp.asarray(np.stack(clear))


def train(cfg, pairs, *, steps, batch, size, lr, seed, init_weights=None):
  if init_weights is None:
    model = minet_jax.MINet(cfg, rngs=nnx.Rngs(seed))
  else:
    model = params_lib.model_from_params(params_lib.Params(weights=init_weights, config=cfg))
  graphdef, state = nnx.split(model)
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(state)

  @jax.jit
  def step(state, opt_state, hazy, clear, key):
    def loss_fn(state):
      m = nnx.merge(graphdef, state)
      mse = jnp.mean(jnp.square(m(hazy) - clear))
      return mse + contractive.weighted_penalty(m, hazy, key=key), mse
    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(state, updates), opt_state, mse

  rng = np.random.default_rng(seed)
  start, log = None, []
  for i in range(steps):
    hazy, clear = random_batch(pairs, rng, batch, size)
    state, opt_state, mse = step(state, opt_state, hazy, clear, jax.random.key(i))
    if start is None:  # Time the steps after the first (compiling) one.
      jax.block_until_ready(mse)
      start = time.time()
    if (i + 1) % max(steps // 8, 1) == 0:
      log.append((i + 1, float(mse)))
      print(f"  step {i + 1}: mse {float(mse):.5f}", flush=True)
  seconds = (time.time() - start) / max(steps - 1, 1)
  return params_lib.params_from_model(nnx.merge(graphdef, state)), seconds, log


def evaluate(params, crops):
  hazy = jnp.asarray(np.stack([h for h, _ in crops]))
  clear = np.stack([c for _, c in crops]) * 255.0
  out = {"hazy_psnr": float(np.mean(metrics.psnr(np.asarray(hazy) * 255.0, clear)))}
  for name, overrides in (("unrolled T=8", dict(solver="unrolled")),
                          ("picard", dict(solver="picard", rtol=EVAL_RTOL,
                                          iterations=(EVAL_CAP,) * 3)),
                          ("anderson", dict(solver="anderson", rtol=EVAL_RTOL,
                                            iterations=(EVAL_CAP,) * 3))):
    cfg = dataclasses.replace(params.config, **overrides)
    model = params_lib.model_from_params(params_lib.Params(weights=params.weights, config=cfg))
    graphdef, state = nnx.split(model)
    y, results = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward_rgb_with_diagnostics(x))(
        state, hazy)
    y = np.clip(np.asarray(y), 0.0, 1.0) * 255.0
    psnr = float(np.mean(metrics.psnr(y, clear)))
    steps = np.stack([np.asarray(r.num_steps) for r in results], axis=1)  # (images, blocks)
    resid = np.stack([np.asarray(r.residual) for r in results], axis=1)
    converged = resid <= EVAL_RTOL
    out[name] = {"psnr": psnr, "converged": int(converged.sum()), "solves": int(resid.size),
                 "mean_steps": steps.mean(axis=0).tolist(),
                 "median_residual": np.median(resid, axis=0).tolist()}
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
  parser.add_argument("--target", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--init", choices=["scratch", "released"], default="scratch",
                      help="train the small model from scratch, or fine-tune the authors' "
                           "released model (64 features; use a smaller --lr, e.g. 1e-4)")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON of the results")
  args = parser.parse_args()

  pairs = load_pairs(folders.find_its_pairs(args.shared / "data/RESIDE/ITS"))
  crops = [(image_io.centre_crop(h, 128, 128), image_io.centre_crop(c, 128, 128))
           for h, c in load_pairs(folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor"))]
  results = []
  init_weights = None
  if args.init == "released":
    released = convert.weights_from_checkpoint(args.shared / "weights" / "minet_its_official.pth")
    init_weights = released.weights
    # The untouched released model is the reference row.
    args.weights = [None] + list(args.weights)
  for weight in args.weights:
    if args.init == "released":
      cfg = dataclasses.replace(released.config, contractive_weight=weight or 0.0,
                                contractive_target=args.target, contractive_iters=4)
    else:
      cfg = minet_jax.ModelConfig(features=16, pre_blocks=1, iterations=(8, 8, 8),
                                  input_format="rgb01", contractive_weight=weight,
                                  contractive_target=args.target, contractive_iters=4)
    if weight is None:
      print("evaluating the released model as it is", flush=True)
      params, seconds, log = released, float("nan"), [(0, float("nan"))]
    else:
      print(f"training with contractive_weight={weight} ({args.steps} steps)", flush=True)
      params, seconds, log = train(cfg, pairs, steps=args.steps, batch=args.batch,
                                   size=args.size, lr=args.lr, seed=args.seed,
                                   init_weights=init_weights)
    scores = evaluate(params, crops)
    report = stability.analyse_image(params, (crops[0][0] * 255).astype(np.uint8), steps=32,
                                     radius_iters=100, radius_window=30, arnoldi_iters=30,
                                     norm_iters=30)
    theorem = [{k: b[k] for k in ("spectral_radius", "spectral_norm", "observed_ratio_tail",
                                  "theorem1_holds")} for b in report["blocks"]]
    results.append({"contractive_weight": weight, "target": args.target,
                    "train_seconds_per_step": seconds, "train_log": log, "eval": scores,
                    "theorem1": theorem})
    print(json.dumps(results[-1], indent=1), flush=True)

  print(f"\n| penalty weight | train s/step | final train MSE | PSNR T=8 (hazy {results[0]['eval']['hazy_psnr']:.2f}) | "
        f"Picard converged (steps/block) | Picard PSNR | Anderson converged (steps/block) | "
        f"Anderson PSNR | rho(eta J) per block | norm per block |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    e = r["eval"]
    steps = lambda s: " / ".join(f"{x:.0f}" for x in s)  # noqa: E731
    radii = " / ".join(f"{b['spectral_radius']:.3f}" for b in r["theorem1"])
    norms = " / ".join(f"{b['spectral_norm']:.2f}" for b in r["theorem1"])
    weight = "released" if r["contractive_weight"] is None else f"{r['contractive_weight']:g}"
    print(f"| {weight} | {r['train_seconds_per_step']:.3f} | "
          f"{r['train_log'][-1][1]:.4f} | {e['unrolled T=8']['psnr']:.2f} | "
          f"{e['picard']['converged']}/{e['picard']['solves']} ({steps(e['picard']['mean_steps'])}) | "
          f"{e['picard']['psnr']:.2f} | "
          f"{e['anderson']['converged']}/{e['anderson']['solves']} "
          f"({steps(e['anderson']['mean_steps'])}) | {e['anderson']['psnr']:.2f} | "
          f"{radii} | {norms} |")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
