"""Draws the README's figures into docs/figures/.

    python benchmarks/figures.py sots [--shared ../shared]
    python benchmarks/figures.py quickstart --workdir workdirs/quickstart [--data-dir DIR]

``sots``: hazy input, the released model's output and the ground truth for three SOTS
indoor sample images, with each image's PSNR (``docs/figures/sots_examples.jpg``).
The weights are ``shared/weights/minet_its_official.pth`` (the release, read by the
torch-free reader), or ``--ckpt`` (anything ``minet_jax.load`` takes). A few seconds
per image on a CPU.

``quickstart``: the validation PSNR of a quickstart run against its training steps,
with the hazy input's and the dark channel prior's scores on the same 24 images
(``docs/figures/quickstart_progress.png``). It reads the run's ``metrics.jsonl``; the
figure in the docs comes from

    python train.py --config configs/quickstart.py --workdir workdirs/quickstart \\
        --config.eval_every=100

(validation every 100 steps instead of 500, for a smoother curve). The DCP line is
computed here on the built ``synthetic_haze`` validation split (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minet_jax  # noqa: E402
from minet_jax import evaluation, image_io, metrics  # noqa: E402

FIGURES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "figures"
DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
SOTS_SAMPLES = ("1400_1", "1403_8", "1405_9")


def sots_figure(shared: pathlib.Path, ckpt: pathlib.Path | None, out: pathlib.Path) -> None:
  params = minet_jax.load(ckpt or shared / "weights" / "minet_its_official.pth")
  root = shared / "data" / "RESIDE" / "SOTS" / "indoor"
  fig, axes = plt.subplots(len(SOTS_SAMPLES), 3, figsize=(9.3, 2.3 * len(SOTS_SAMPLES)),
                           squeeze=False)
  for row, name in zip(axes, SOTS_SAMPLES):
    hazy = image_io.read_rgb(root / "hazy" / f"{name}.png")
    gt = image_io.read_rgb(root / "gt" / f"{name.split('_')[0]}.png")
    gt = image_io.centre_crop(gt, *hazy.shape[:2])
    clear = np.asarray(minet_jax.apply(params, hazy))
    scores = [metrics.dehazing_scores(x * 255.0, gt * 255.0)[0] for x in (hazy, clear)]
    titles = [f"hazy input, {scores[0]:.1f} dB", f"MI-Net, {scores[1]:.1f} dB",
              f"ground truth ({name})"]
    for ax, image, title in zip(row, (hazy, clear, gt), titles):
      ax.imshow(np.clip(image, 0, 1))
      ax.set_title(title, fontsize=9)
      ax.axis("off")
  fig.suptitle("SOTS indoor: the released model (PSNR against the ground truth)", fontsize=10)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100, pil_kwargs={"quality": 85})
  print(f"wrote {out}")


def quickstart_figure(workdir: pathlib.Path, data_dir: str | None, out: pathlib.Path) -> None:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = sorted((r["step"], r["psnr"], r["hazy_psnr"]) for r in records
                 if r.get("split") == "eval")
  if not evals:
    sys.exit(f"{workdir}/metrics.jsonl holds no validation scores")
  steps, psnr, hazy = zip(*evals)
  report = evaluation.evaluate(None, "synthetic_haze", methods=["dcp"], split="validation",
                               data_dir=data_dir, progress=False)
  dcp = report.summary()["dcp"]["psnr"]
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.plot(steps, psnr, "o-", color="C0", markersize=3,
          label=f"quickstart MI-Net (last: {psnr[-1]:.2f} dB)")
  ax.axhline(dcp, color="C2", linestyle="--", label=f"dark channel prior ({dcp:.2f} dB)")
  ax.axhline(hazy[-1], color="C3", linestyle=":", label=f"hazy input ({hazy[-1]:.2f} dB)")
  ax.set_xlabel("training step (4 crops of 64x64 each)")
  ax.set_ylabel("validation PSNR (dB)")
  ax.set_title("configs/quickstart.py: 24 synthetic validation images", fontsize=10)
  ax.set_xlim(0, max(steps))
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  print(f"wrote {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="figure", required=True)
  sots = sub.add_parser("sots", help="before / after / ground truth on SOTS samples")
  sots.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  sots.add_argument("--ckpt", type=pathlib.Path, default=None)
  sots.add_argument("--out", type=pathlib.Path, default=FIGURES / "sots_examples.jpg")
  quick = sub.add_parser("quickstart", help="validation PSNR of a quickstart run")
  quick.add_argument("--workdir", type=pathlib.Path, required=True)
  quick.add_argument("--data-dir", default=None, help="where synthetic_haze is built")
  quick.add_argument("--out", type=pathlib.Path, default=FIGURES / "quickstart_progress.png")
  args = parser.parse_args()
  if args.figure == "sots":
    sots_figure(args.shared, args.ckpt, args.out)
  else:
    quickstart_figure(args.workdir, args.data_dir, args.out)


if __name__ == "__main__":
  main()
