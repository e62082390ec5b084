"""Full-image parity with the authors' PyTorch outputs (two 460x620 SOTS images).

    python benchmarks/parity_full.py [--shared ../shared] [--ckpt DIR] [--precision default]

Converts the released checkpoint (unless --ckpt names a converted folder), runs
the two SOTS images whose official outputs are in
``shared/parity/official_outputs.npz`` and prints PSNR(ours, theirs) and the
largest absolute difference on the 0..255 scale. Exits non-zero below 50 dB.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import minet_jax
from minet_jax import convert, image_io, metrics
from minet_jax.core.config import add_speed_arguments, speed_changes

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--ckpt", type=pathlib.Path, default=None,
                      help="converted checkpoint folder (default: convert into a temp dir)")
  add_speed_arguments(parser)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = args.ckpt
    if ckpt is None:
      ckpt = pathlib.Path(tmp) / "minet_its"
      convert.convert(args.shared / "weights" / "minet_its_official.pth", ckpt)
    params = minet_jax.load(ckpt).replace_config(**speed_changes(args))
  model = minet_jax.model_from_params(params)
  forward = jax.jit(lambda x: model(x))
  ref = np.load(args.shared / "parity" / "official_outputs.npz")
  worst = np.inf
  print(f"{'image':<8} {'PSNR vs official (dB)':>22} {'max |diff| (0..255)':>20} {'s':>6}")
  for name in ("1400_1", "1403_8"):
    hazy = image_io.read_rgb(args.shared / "data/RESIDE/SOTS/indoor/hazy" / f"{name}.png")
    start = time.perf_counter()
    ours = np.asarray(forward(jnp.asarray(hazy[None])))[0] * 255.0
    seconds = time.perf_counter() - start
    theirs = ref[f"{name}_output_rgb"]
    p = float(metrics.psnr(ours, theirs))
    worst = min(worst, p)
    print(f"{name:<8} {p:>22.2f} {np.abs(ours - theirs).max():>20.3g} {seconds:>6.1f}")
  return 0 if worst >= 50.0 else 1


if __name__ == "__main__":
  sys.exit(main())
