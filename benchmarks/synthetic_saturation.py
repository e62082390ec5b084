"""How much of a hazy image is saturated white: the SOTS samples against the synthetic set.

    python benchmarks/synthetic_saturation.py [--exposure 1.0 2.5] [--every 5] [--out FILE.json]

A pixel counts as saturated when every channel is >= 250 (8-bit). Prints the share of
such pixels in each SOTS sample of ``../shared``, then the same share over the train
split of `configs/stable.py`'s synthetic set (the hazy images of every ``--every``-th
clear image), without camera exposure and with ``--exposure``
(`SyntheticHazeConfig.exposure_range`). The three samples on which trained stage
models' block 2 expands are the saturated ones (docs/STABILITY.md, "Where block 2
expands"); docs/DATA.md quotes these figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from minet_jax.data import folders, synthetic
from minet_jax.train import config_file
from minet_jax.train.inputs import synthetic_config

import stable_minet  # benchmarks/stable_minet.py: where ../shared is

SATURATED = 250  # 8-bit level, in every channel, from which a pixel counts as saturated
_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def saturated(image: np.ndarray) -> np.ndarray:
  """Mask of the pixels of uint8 RGB images (..., 3) with every channel >= 250."""
  return image.min(axis=-1) >= SATURATED


def saturated_share(image: np.ndarray) -> float:
  """Share of the pixels of uint8 RGB images (..., 3) with every channel >= 250."""
  return float(saturated(image).mean())


def synthetic_shares(config: synthetic.SyntheticHazeConfig, every: int) -> dict:
  """Saturated shares of every hazy image of every ``every``-th clear image (train split)."""
  shares = np.array([saturated_share(ex["hazy"])
                     for position in range(0, synthetic.num_scenes("train", config), every)
                     for ex in synthetic.scene_examples("train", position, config)])
  summary = {"images": len(shares), "median": float(np.median(shares)),
             "p90": float(np.quantile(shares, 0.9)), "max": float(shares.max()),
             "over_5_percent": float((shares > 0.05).mean())}
  print(f"  exposure {config.exposure_range}: {summary['images']} images, median "
        f"{summary['median']:.4f}, 90th percentile {summary['p90']:.4f}, max "
        f"{summary['max']:.4f}; more than 5 % saturated: {summary['over_5_percent']:.3f} "
        "of the images", flush=True)
  return summary


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--exposure", type=float, nargs=2, default=[1.0, 2.5],
                      metavar=("LOW", "HIGH"))
  parser.add_argument("--every", type=int, default=5,
                      help="take the hazy images of every n-th clear image of the train split")
  parser.add_argument("--shared", type=pathlib.Path, default=stable_minet.DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.every < 1:
    raise SystemExit(f"synthetic_saturation: --every must be >= 1, got {args.every}")
  data = config_file.load_module(_CONFIGS / "stable.py").get_config().data
  base = dataclasses.replace(synthetic_config(data), exposure_range=(1.0, 1.0))
  try:
    exposed = dataclasses.replace(base, exposure_range=tuple(args.exposure))
  except ValueError as e:
    raise SystemExit(f"synthetic_saturation: --exposure: {e}") from None
  report = {"threshold": SATURATED, "sots": {}}
  print("SOTS samples, share of saturated pixels:")
  for record in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor"):
    report["sots"][record.key] = saturated_share(folders.load_pair(record)[0])
    print(f"  {record.key:<8} {report['sots'][record.key]:.4f}", flush=True)
  print(f"configs/stable.py's synthetic set ({base.image_size[0]}x{base.image_size[1]}), "
        f"train split, the hazy images of every {args.every}th clear image:")
  report["synthetic"] = {str(list(c.exposure_range)): synthetic_shares(c, args.every)
                         for c in (base, exposed)}
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
