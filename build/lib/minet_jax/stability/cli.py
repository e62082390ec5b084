"""Command line of the Theorem-1 check: ``python -m minet_jax.stability``.

Loads a checkpoint (or converts the authors' PyTorch one), analyses one image with
`minet_jax.stability.analyse_image`, writes the report
(`minet_jax.stability.report.write_report`) and prints the per-block table.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from minet_jax import api, checkpoint, convert, image_io, stability
from minet_jax.image_io import ImageReadError, read_rgb
from minet_jax.params import Params
from minet_jax.stability import report as report_lib
from minet_jax.torch_pickle import UnsafePickleError


def _load_params(args: argparse.Namespace) -> Params:
  if args.ckpt:
    return checkpoint.load(args.ckpt)
  return convert.weights_from_checkpoint(args.pth)


def main(argv: list[str] | None = None) -> int:
  """Runs the check; returns the exit status (2: the model or image could not be read)."""
  parser = argparse.ArgumentParser(
      prog="python -m minet_jax.stability",
      description="Checks Theorem 1 (|lambda(df/dg)| < 1/eta) for every IM-block on one image.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--ckpt", help="minet-jax checkpoint folder (minet_jax.save / convert)")
  source.add_argument("--pth", help="the authors' PyTorch checkpoint, converted on the fly")
  parser.add_argument("--image", required=True, help="RGB image (PNG/JPEG)")
  parser.add_argument("--out", required=True, help="folder for stability.json and the plots")
  parser.add_argument("--steps", type=int, default=32,
                      help="Picard steps from each block's input for the residual curve")
  parser.add_argument("--radius-iters", type=int, default=60)
  parser.add_argument("--radius-window", type=int, default=20)
  parser.add_argument("--arnoldi-iters", type=int, default=30)
  parser.add_argument("--norm-iters", type=int, default=30)
  parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                      help="analyse the centre HxW crop only (faster)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be >= 2 (ratios need two residuals)")

  try:
    params = _load_params(args)
  except (OSError, ValueError, UnsafePickleError) as e:
    print(f"error: could not load the model: {e}", file=sys.stderr)
    return 2
  try:
    image = read_rgb(args.image, dtype=np.uint8)
  except (OSError, ImageReadError) as e:
    print(f"error: could not read {args.image}: {e}", file=sys.stderr)
    return 2
  if args.crop:
    h, w = args.crop
    if not (0 < h <= image.shape[0] and 0 < w <= image.shape[1]):
      parser.error(f"--crop {h} {w} does not fit the {image.shape[0]}x{image.shape[1]} image")
    image = image_io.centre_crop(image, h, w)
  api.validate_image(image)
  report = stability.analyse_image(
      params, image, seed=args.seed, steps=args.steps, radius_iters=args.radius_iters,
      radius_window=args.radius_window, arnoldi_iters=args.arnoldi_iters,
      norm_iters=args.norm_iters)
  report["image"] = str(args.image)
  paths = report_lib.write_report(report, args.out)
  print("\n".join(stability.summary_lines(report)))
  print("wrote " + ", ".join(str(p) for p in paths))
  return 0
