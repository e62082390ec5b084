"""How close the radius penalty's gradient is to d rho, on a real block at full resolution.

    python benchmarks/radius_gradient.py [--ckpt its] [--block 3] [--fraction 0.7]
        [--stages 2] [--image 1400_1] [--iters 8 16 40] [--reference 80]
        [--shared ../shared] [--out FILE.json]

Block ``--block`` of ``--ckpt``, made a stage block (``--fraction``, ``--stages``; the
released f as the two-stage block 3 of `configs/stable_sdirk.py`'s trials by
default), is put at the point the training's radius hinge looks at: each stage's
solution in the step that answers the checkpoint's own block output, from that block's
input, on one SOTS sample at full resolution (the released model's operating point;
an analysis, no training). There, for each stage, the two estimates of the stage map's
spectral radius that `ModelConfig.contractive_kind` offers are differentiated with
respect to the block's parameters after each of ``--iters`` power-iteration steps:

* "radius" (`contractive.block_radius`): ||J v||, v the power iterate held constant,
  a surrogate of d rho for a non-normal J;
* "radius_exact" (`contractive.block_radius_exact`): J projected onto the power
  iterations' planes of J and J^T, whose derivative is the dominant eigenvalue's own
  once those planes hold its eigenvectors.

Printed and written: each estimate's value, and the cosine and norm ratio of its
gradient to the reference, "radius_exact" after ``--reference`` steps (at convergence,
d rho itself), and whether "radius_exact" found its eigenpair (``found``; where it did
not, it is "radius" itself; a reference that did not is reported on stderr). Same seed
for every estimate. Float32.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from minet_jax import hub
from minet_jax.core.params import model_from_params
from minet_jax.data import folders
from minet_jax.stability import contractive

from stable_minet import DEFAULT_SHARED

ESTIMATES = {"radius": contractive.block_radius, "radius_exact": contractive.block_radius_exact}


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
  return value


def gradients(block, base, g, iters: int, kind: str) -> tuple[float, np.ndarray, bool]:
  """(the estimate, its gradient with respect to the block's parameters, flattened,
  whether "radius_exact" found its eigenpair: True for "radius")."""
  graphdef, state = nnx.split(block)

  def estimate(state):
    blk = nnx.merge(graphdef, state)
    if kind == "radius":
      return contractive.block_radius(blk, base, g, jax.random.key(0), iters)[0], True
    value, found = contractive.block_radius_exact(blk, base, g, jax.random.key(0), iters,
                                                  with_found=True)
    return value[0], found[0]

  (value, found), grad = jax.jit(jax.value_and_grad(estimate, has_aux=True))(state)
  return (float(value), np.concatenate([np.ravel(a) for a in jax.tree.leaves(grad)]),
          bool(found))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", default="its")
  parser.add_argument("--block", type=_positive_int, default=3, help="IM-block, from 1")
  parser.add_argument("--fraction", type=float, default=0.7)
  parser.add_argument("--stages", type=int, choices=(1, 2), default=2)
  parser.add_argument("--image", default="1400_1", help="a SOTS sample")
  parser.add_argument("--iters", type=_positive_int, nargs="+", default=[8, 16, 40])
  parser.add_argument("--reference", type=_positive_int, default=80)
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  try:
    params = hub.resolve(args.ckpt)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.block > params.config.num_blocks:
    parser.error(f"--block {args.block}: the model has {params.config.num_blocks} IM-blocks")
  index = args.block - 1
  fractions, stages = list(params.config.stage_fraction), list(params.config.stages)
  fractions[index], stages[index] = args.fraction, args.stages
  try:
    student = model_from_params(params.replace_config(stage_fraction=tuple(fractions),
                                                      stages=tuple(stages)))
  except ValueError as e:
    parser.error(f"--fraction / --stages: {e}")
  records = [r for r in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
             if r.key == args.image]
  if not records:
    parser.error(f"--image: no SOTS sample {args.image} under {args.shared}")
  hazy = jax.numpy.asarray(folders.load_pair(records[0])[0][None], jax.numpy.float32) / 255.0

  model = model_from_params(params)
  g0, output = jax.jit(lambda x: (lambda r: (r.g0, r.output))(
      model.solve_blocks(model.model_input(x))[index]))(hazy)
  block = student.im_blocks[index]
  points = jax.jit(block.stage_points)(g0, output)
  result = {"args": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                     for k, v in vars(args).items()}, "stages": []}
  began = time.perf_counter()
  for stage, (base, g) in enumerate(points, start=1):
    rho, reference, found = gradients(block, base, g, args.reference, "radius_exact")
    if not found:
      print(f"stage {stage}: radius_exact found no eigenpair in {args.reference} steps, so "
            "its reference is the one-sided estimate's gradient; raise --reference",
            file=sys.stderr)
    rows = []
    for kind in ESTIMATES:
      for iters in args.iters:
        value, grad, hit = gradients(block, base, g, iters, kind)
        cosine = float(grad @ reference / (np.linalg.norm(grad) * np.linalg.norm(reference)))
        ratio = float(np.linalg.norm(grad) / np.linalg.norm(reference))
        rows.append({"kind": kind, "iters": iters, "value": value, "cosine": cosine,
                     "norm_ratio": ratio, "found": hit})
        print(f"stage {stage} (rho {rho:.3f} by radius_exact, {args.reference} steps): "
              f"{kind:12s} {iters:3d} steps: {value:.3f}, gradient cosine {cosine:.3f}, "
              f"norm ratio {ratio:.3f}{'' if hit else ' (fell back to radius)'}", flush=True)
    result["stages"].append({"stage": stage, "reference_rho": rho, "reference_found": found,
                             "rows": rows})
  result["seconds"] = time.perf_counter() - began
  if args.out:
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
