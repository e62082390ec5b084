"""Command line of the Theorem-1 check: ``python -m minet_jax.stability``.

Loads a checkpoint (or converts the authors' PyTorch one), analyses one image with
`minet_jax.stability.analyse_image`, writes the report
(`minet_jax.stability.report.write_report`) and prints the per-block table. Everything
that can be checked before the analysis is (settings, the output folder, the model,
the image), so a run that cannot finish fails in seconds, not after the analysis.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

from minet_jax.core import api, files
from minet_jax.core.config import (add_solve_arguments, checked_speed_changes,
                                   unused_speed_options, warnings_as_notes)
from minet_jax import convert, image_io, stability
from minet_jax.image_io import ImageReadError, read_rgb
from minet_jax.core.params import Params
from minet_jax.stability import report as report_lib
from minet_jax.convert.torch_pickle import UnsafePickleError

_MODULE_PROG = "python -m minet_jax.stability"


def _prog() -> str:
  """The name usage lines show: the console script's (``minet-stability``) as invoked,
  ``python -m minet_jax.stability`` for the module."""
  name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
  return _MODULE_PROG if name in ("", "-c", "__main__.py", "cli.py") else name


def _load_params(args: argparse.Namespace) -> Params:
  if args.ckpt:  # What every tool's --ckpt names (`minet_jax.hub.resolve`).
    from minet_jax import hub
    return hub.resolve(args.ckpt)
  return convert.weights_from_checkpoint(args.pth)


def main(argv: list[str] | None = None) -> int:
  """Runs the check; returns the exit status (2: bad settings, or the model, image or
  output folder cannot be used)."""
  parser = argparse.ArgumentParser(
      prog=_prog(),
      description="Checks Theorem 1 (|lambda(df/dg)| < 1/eta; 1/(s eta) for a block solving "
                  "the stage of its step at fraction s) for every IM-block on one image.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--ckpt", help="the weights: 'its' (the authors' released model, "
                      "downloaded once into ~/.cache/minet_jax), an authors' .pth file, a "
                      "checkpoint folder, or a training workdir")
  source.add_argument("--pth", help="the authors' PyTorch checkpoint, converted on the fly")
  parser.add_argument("--image", required=True, help="RGB image (PNG/JPEG)")
  parser.add_argument("--out", required=True,
                      help="folder for stability.json and the plots (new or empty)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into an --out folder that already holds files")
  parser.add_argument("--steps", type=int, default=32,
                      help="Picard steps from each block's input for the residual curve")
  parser.add_argument("--radius-iters", type=int, default=60)
  parser.add_argument("--radius-window", type=int, default=20,
                      help="last power-iteration steps the growth rate is taken over "
                           "(<= --radius-iters)")
  parser.add_argument("--arnoldi-iters", type=int, default=30)
  parser.add_argument("--norm-iters", type=int, default=30)
  parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                      help="analyse the centre HxW crop only (faster)")
  parser.add_argument("--seed", type=int, default=0, help="in [0, 2**32)")
  parser.add_argument("--as-float32", action="store_true",
                      help="analyse a bfloat16 checkpoint's weights in float32")
  # The operating point is where the model's solver stops; Theorem 1 is about the fixed
  # point itself, which a tighter solve (--rtol 1e-6 --max-steps 300) comes closer to.
  add_solve_arguments(parser)
  args = parser.parse_args(argv)
  settings = dict(steps=args.steps, radius_iters=args.radius_iters,
                  radius_window=args.radius_window, arnoldi_iters=args.arnoldi_iters,
                  norm_iters=args.norm_iters)
  try:
    stability.check_settings(seed=args.seed, **settings)
  except ValueError as e:
    parser.error(f"--{str(e).replace('_', '-')}")
  try:  # The solve overrides alone, before any model is loaded or converted.
    changes = checked_speed_changes(args)
  except ValueError as e:
    parser.error(str(e))
  out = pathlib.Path(args.out)
  try:
    files.check_output_folder(out, overwrite=args.overwrite)
  except ValueError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2

  try:
    with warnings_as_notes(f"{parser.prog}: note: "):  # as its other notes
      params = _load_params(args)
  except (OSError, ValueError, UnsafePickleError) as e:
    print(f"{parser.prog}: error: could not load the model: {e}", file=sys.stderr)
    return 2
  try:
    with warnings_as_notes(f"{parser.prog}: note: "):
      params = params.replace_config(**changes)
    # Now that the report's files are known: a folder in the way of one is refused.
    files.check_output_folder(out, overwrite=True,
                              writes=report_lib.report_names(len(params.config.dilations)))
  except ValueError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  note = unused_speed_options(changes, params.config)
  if note:
    print(f"{parser.prog}: note: {note}", file=sys.stderr)
  if params.config.dtype != "float32":
    if not args.as_float32:
      print(f"{parser.prog}: error: the checkpoint computes in {params.config.dtype}; the "
            "analysis needs float32 (its iterations resolve changes far below bfloat16 "
            "rounding): pass --as-float32 to analyse its weights in float32", file=sys.stderr)
      return 2
    params = params.replace_config(dtype="float32")
  try:
    image = read_rgb(args.image, dtype=np.uint8)
  except (OSError, ImageReadError) as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  if args.crop:
    h, w = args.crop
    if not (0 < h <= image.shape[0] and 0 < w <= image.shape[1]):
      parser.error(f"--crop {h} {w} does not fit the {image.shape[0]}x{image.shape[1]} image")
    image = image_io.centre_crop(image, h, w)
  api.validate_image(image)
  report = stability.analyse_image(params, image, seed=args.seed, **settings)
  report["image"] = str(args.image)
  paths = report_lib.write_report(report, out)
  print("\n".join(stability.summary_lines(report)))
  print("wrote " + ", ".join(str(p) for p in paths))
  return 0
