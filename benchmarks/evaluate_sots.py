"""The SOTS-sample evaluation of the authors' released model, checked against their scores.

    python benchmarks/evaluate_sots.py [--shared ../shared] [--ckpt DIR] [--out DIR]
        [--precision default] [--dtype bfloat16]

Converts ``shared/weights/minet_its_official.pth`` (unless --ckpt names a
converted folder), runs `minet_jax.evaluation.evaluate` on the 10 SOTS indoor
sample images (MI-Net, hazy input, DCP), prints the table, and compares every
MI-Net and hazy score with ``shared/parity/official_scores.json``. Exits
non-zero when the MI-Net mean leaves 36.30 +/- 0.05 dB / 0.9771 +/- 0.0005.
Takes a few minutes on a CPU (one full-size MI-Net forward per image).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

from minet_jax import convert, evaluation
from minet_jax.core.config import add_speed_arguments, speed_changes

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--ckpt", type=pathlib.Path, default=None)
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="folder for per_image.csv and results.json")
  add_speed_arguments(parser)
  args = parser.parse_args()
  official = json.loads((args.shared / "parity" / "official_scores.json").read_text())
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = args.ckpt
    if ckpt is None:
      ckpt = pathlib.Path(tmp) / "minet_its"
      convert.convert(args.shared / "weights" / "minet_its_official.pth", ckpt)
    report = evaluation.evaluate(ckpt, args.shared / "data/RESIDE/SOTS/indoor", out_dir=args.out,
                                 config_changes=speed_changes(args))
  print(report.table())
  print()
  print(f"{'image':<8} {'ours PSNR':>10} {'official':>9} {'ours SSIM':>10} {'official':>9}")
  for row in report.rows:
    if row.method == "minet" and not row.error:
      ref_p, ref_s = official["per_image"][f"{row.key}.png"]["official_minet"]
      print(f"{row.key:<8} {row.psnr:>10.4f} {ref_p:>9.4f} {row.ssim:>10.5f} {ref_s:>9.5f}")
  mean = report.summary()["minet"]
  ok = abs(mean["psnr"] - 36.30) <= 0.05 and abs(mean["ssim"] - 0.9771) <= 0.0005
  print(f"\nMI-Net mean {mean['psnr']:.4f} dB / {mean['ssim']:.5f} "
        f"(official {official['mean']['official_minet'][0]:.4f} / "
        f"{official['mean']['official_minet'][1]:.5f}): {'OK' if ok else 'OUT OF TOLERANCE'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
