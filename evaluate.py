"""Scores MI-Net, the hazy input and the dark channel prior on paired images.

    python evaluate.py --ckpt checkpoints/minet_its --data path/to/SOTS/indoor
    python evaluate.py --ckpt checkpoints/minet_its --data reside_sots/indoor --split test

Prints ``method | PSNR | SSIM | s/image``; ``--out DIR`` adds per_image.csv and
results.json, ``--save-images DIR`` the outputs as PNG. Exits with 1 when any
image failed (the others are still scored). See `minet_jax.evaluation`.
"""

from __future__ import annotations

import argparse
import sys

from minet_jax import evaluation


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", help="minet-jax checkpoint folder (python -m minet_jax.convert)")
  parser.add_argument("--data", required=True,
                      help="paired folder (SOTS/ITS layout, or hazy/ + gt/ or clear/) or a "
                           "built dataset name such as reside_sots/indoor")
  parser.add_argument("--methods", default=",".join(evaluation.METHODS),
                      help="comma-separated subset of minet,hazy,dcp (default: all)")
  parser.add_argument("--out", help="folder for per_image.csv and results.json")
  parser.add_argument("--save-images", help="folder for output PNGs (<method>/<image>.png)")
  parser.add_argument("--limit", type=int, help="evaluate only the first N (>= 0) pairs")
  parser.add_argument("--layout", default="auto", choices=("auto", "sots", "its", "paired"),
                      help="folder layout (default: detect)")
  parser.add_argument("--split", default="test", help="split of a dataset name (default: test)")
  parser.add_argument("--data-dir", help="where built datasets live (dataset names only)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  try:
    report = evaluation.evaluate(
        args.ckpt, args.data, methods=methods, out_dir=args.out, save_images=args.save_images,
        limit=args.limit, layout=args.layout, split=args.split, data_dir=args.data_dir,
        progress=not args.no_progress)
  except (ValueError, OSError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  print(report.table())
  return 1 if any(r.error for r in report.rows) else 0


if __name__ == "__main__":
  sys.exit(main())
