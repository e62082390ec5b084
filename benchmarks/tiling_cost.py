"""What tiling costs: PSNR of tiled against whole-image MI-Net output.

    python benchmarks/tiling_cost.py --ckpt checkpoints/minet_its [--tiles 256:32,256:64,384:64]

Images: the Middlebury motorcycle (500x741, bundled with scikit-image) hazed
with I = J t + A (1 - t) from its own disparity (t = exp(-1.2 d), d = 1 at the
far end, A = (0.9, 0.9, 0.92)), and SOTS ``1400_1`` (460x620) when the shared
reference folder is present. For each tile size / overlap / blend it prints
PSNR(tiled, whole) and, against the clear image, PSNR(whole) and PSNR(tiled).
Instance normalisation makes every tile normalise with its own statistics, so
the tiled result is an approximation; this script measures how close.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import skimage.data

import minet_jax
from minet_jax import metrics, tiling
from minet_jax.data import folders

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def hazy_motorcycle() -> tuple[np.ndarray, np.ndarray]:
  left, _, disp = skimage.data.stereo_motorcycle()
  clear = left.astype(np.float32) / 255.0
  finite = np.isfinite(disp)
  disp = np.where(finite, disp, disp[finite].min())  # unknown disparity: treat as far
  depth = disp.min() / disp
  t = np.exp(-1.2 * depth)[..., None]
  hazy = clear * t + np.array([0.9, 0.9, 0.92], np.float32) * (1.0 - t)
  return hazy.astype(np.float32), clear


def _psnr(a, b) -> float:
  return float(metrics.psnr(np.asarray(a) * 255.0, np.asarray(b) * 255.0))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", required=True, type=pathlib.Path)
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--tiles", default="256:32,256:64,384:64",
                      help="comma-separated tile:overlap pairs")
  args = parser.parse_args()
  params = minet_jax.load(args.ckpt)
  images = {"motorcycle (synthetic haze)": hazy_motorcycle()}
  sots = args.shared / "data/RESIDE/SOTS/indoor"
  if sots.is_dir():
    record = next(r for r in folders.find_sots_pairs(sots) if r.key == "1400_1")
    hazy, clear = folders.load_pair(record)
    images["SOTS 1400_1"] = (hazy.astype(np.float32) / 255.0, clear.astype(np.float32) / 255.0)
  configs = [tuple(int(v) for v in item.split(":")) for item in args.tiles.split(",")]

  print(f"{'image':<28} {'size':>9} {'tile':>5} {'ovl':>4} {'blend':>7} "
        f"{'tiled vs whole':>15} {'whole vs GT':>12} {'tiled vs GT':>12} {'s':>6}")
  for name, (hazy, clear) in images.items():
    start = time.perf_counter()
    whole = np.asarray(minet_jax.apply(params, hazy))
    whole_s = time.perf_counter() - start
    size = f"{hazy.shape[0]}x{hazy.shape[1]}"
    print(f"{name:<28} {size:>9} {'-':>5} {'-':>4} {'-':>7} {'-':>15} "
          f"{_psnr(whole, clear):>12.2f} {'-':>12} {whole_s:>6.1f}")
    for tile, overlap in configs:
      cache: dict = {}

      def run(x):  # Both blends reuse the same tile outputs.
        key = (x.shape, x.tobytes())
        if key not in cache:
          cache[key] = np.asarray(minet_jax.apply(params, np.ascontiguousarray(x)))
        return cache[key]

      for blend in tiling.BLENDS:
        start = time.perf_counter()
        tiled = tiling.tiled_apply(run, hazy, tile=tile, overlap=overlap, blend=blend)
        seconds = f"{time.perf_counter() - start:6.1f}" if blend == tiling.BLENDS[0] else "reused"
        print(f"{name:<28} {size:>9} {tile:>5} {overlap:>4} {blend:>7} "
              f"{_psnr(tiled, whole):>15.2f} {_psnr(whole, clear):>12.2f} "
              f"{_psnr(tiled, clear):>12.2f} {seconds:>6}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
