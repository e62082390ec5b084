"""A stable MI-Net put together from the IM-blocks of several models, scored on SOTS.

    python benchmarks/stable_compose.py --block WORKDIR_1:0.3 --block WORKDIR_2:0.3 \
        --block CHECKPOINT:0.7 [--shared ../shared] [--out FILE.json] [--save FOLDER]

Block i of the result is block i of the i-th ``--block`` model (a training workdir, a
checkpoint folder or the authors' .pth) at the stage fraction given after the colon,
with that model's radius target for it (`contractive_target`: what the block trained
with); everything else (the encoder, the layers after the blocks and the solve
settings) comes from the first model. Block-wise distillation trains each
block on its own (`configs/stable.py`: only the block's f receives gradients, from its
own matching term and hinge), so the blocks of runs that differ only in another block's
settings are the blocks the run with all their settings would train, bit for bit; with
a released or untrained block, the result shows what one block's fraction is worth.

Scored like `stable_minet.py`'s trained solver: PSNR / SSIM on the SOTS samples at full
resolution, solves converged and mean steps per block, with the first model's solver
(rtol, cap, best-so-far answers). ``--save`` writes the composed checkpoint, which
`stable_minet.py --stable` measures fully.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import minet_jax
from minet_jax.core import checkpoint
from minet_jax.core.params import Params
from minet_jax.data import folders
from minet_jax.train.state import replace_blocks

from stable_minet import DEFAULT_SHARED, load_stable, scores


def block_spec(text: str) -> tuple[pathlib.Path, float]:
  """``PATH:FRACTION`` -> (path, fraction)."""
  path, sep, fraction = text.rpartition(":")
  try:
    value = float(fraction)
  except ValueError:
    value = None
  if not sep or not path or value is None:
    raise argparse.ArgumentTypeError(f"expected PATH:FRACTION, got {text!r}")
  return pathlib.Path(path), value


def compose(models: list[Params], fractions: list[float]) -> Params:
  """Block i, its radius target and its number of stages from ``models[i]``, at
  ``fractions[i]``; the rest from ``models[0]``."""
  first = models[0]
  blocks = first.config.num_blocks
  if len(models) != blocks:
    raise ValueError(f"the first model has {blocks} IM-blocks; give one --block for each, "
                     f"got {len(models)}")
  for i, model in enumerate(models):
    if not model.config.same_weights(first.config):
      raise ValueError(f"--block {i + 1}: not the first model's architecture")
  targets = tuple(models[i].config.contractive_target[i] for i in range(blocks))
  stages = tuple(models[i].config.stages[i] for i in range(blocks))
  cfg = dataclasses.replace(first.config, stage_fraction=tuple(fractions),
                            contractive_target=targets, stages=stages)
  weights = replace_blocks(first, dict(enumerate(models))).weights
  return Params(weights=weights, config=cfg)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--block", action="append", type=block_spec, required=True,
                      metavar="PATH:FRACTION", help="one per IM-block, in order")
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="a JSON file; the result is added under the blocks' description")
  parser.add_argument("--save", type=pathlib.Path, default=None,
                      help="write the composed checkpoint here (a new folder)")
  args = parser.parse_args()
  for path, fraction in args.block:
    try:  # The config's own check of a fraction.
      minet_jax.ModelConfig(stage_fraction=fraction)
    except ValueError as e:
      parser.error(f"--block {path}:{fraction:g}: {e}")
  try:
    # `load_stable` reads a workdir's kept checkpoint, a checkpoint folder or a .pth.
    params = compose([load_stable(path)[0] for path, _ in args.block],
                     [fraction for _, fraction in args.block])
  except (ValueError, minet_jax.CheckpointError) as e:
    parser.error(str(e))
  if args.save:
    checkpoint.save(params, args.save)
  pairs = [(r.key, *folders.load_pair(r))
           for r in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")]
  result = scores(params, pairs)
  name = " + ".join(f"{path}:{fraction:g}" for path, fraction in args.block)
  print(f"{name}: {result['psnr']:.3f} dB / {result['ssim']:.5f}, converged "
        f"{result['converged']}/{result['solves']}, mean steps "
        + " / ".join(f"{s:.1f}" for s in result["mean_steps"]))
  if args.out:
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report[name] = {"stage_fraction": list(params.config.stage_fraction),
                    "solve": params.config.solve_settings(), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
