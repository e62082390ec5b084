"""Theorem 1 and the IM-block solvers on the released weights, measured on SOTS.

    python benchmarks/stability_sots.py [--shared ../shared] [--out docs/stability]
        [--images 1400_1 1403_8 ...] [--configs released picard16 ...]
        [--stability-image 1400_1] [--skip-stability] [--skip-psnr]

1. Stability: `minet_jax.stability.analyse_image` on one SOTS image (full size unless
   --crop): per block spectral radius (power iteration and Arnoldi) and norm of
   eta*df/dg at the released operating point, and a 32-step Picard residual curve from
   the block's input. Writes ``stability.json`` and ``block<i>_residuals.png``.
2. Solvers: the SOTS indoor images through the model with each block run as in
   `CONFIGS` (released T = 8, Picard for 16 and 32 steps, Anderson and damped Picard
   to tolerance); PSNR/SSIM (`minet_jax.metrics`, the paper's protocol) and per-block
   steps/residuals. Merges into ``sots_solvers.json`` (so configurations can be run
   on different image sets in separate calls), plots ``solvers_residuals.png`` (the
   --stability-image's residual curves per block and solver) and prints a Markdown
   table.

CPU time: about half a minute per full-size forward at T = 8 on two cores; the whole
run takes of the order of an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax.core import params as params_lib
from minet_jax import convert, image_io, metrics, stability
from minet_jax.stability import report as stability_report
from minet_jax.data import folders

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))

# name -> (label, ModelConfig overrides). "iterations" is the step count or the cap.
CONFIGS = {
    "released": ("unrolled, T = 8 (released)", dict(solver="unrolled", iterations=(8, 8, 8))),
    "picard16": ("Picard, T = 16", dict(solver="unrolled", iterations=(16, 16, 16))),
    "picard32": ("Picard, T = 32", dict(solver="unrolled", iterations=(32, 32, 32))),
    "anderson": ("Anderson m=5, rtol 1e-3, <= 100 steps",
                 dict(solver="anderson", rtol=1e-3, anderson_m=5, iterations=(100, 100, 100))),
    "damped": ("damped Picard beta=0.5, rtol 1e-3, <= 100 steps",
               dict(solver="anderson", rtol=1e-3, anderson_m=1, anderson_beta=0.5,
                    iterations=(100, 100, 100))),
}


def _forward(params: params_lib.Params):
  model = params_lib.model_from_params(params)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x):
    y, results = nnx.merge(graphdef, state).forward_rgb_with_diagnostics(x)
    return jnp.clip(y, 0.0, 1.0), [(r.num_steps, r.residual, r.residual_history)
                                   for r in results]

  return lambda x: run(state, x)


def run_solvers(params, records, config_names, out_dir, plot_image):
  """Runs `config_names` on `records`; merges into an existing ``sots_solvers.json``."""
  json_path = out_dir / "sots_solvers.json"
  results = json.loads(json_path.read_text()) if json_path.exists() else {}
  for name in config_names:
    label, overrides = CONFIGS[name]
    cfg = dataclasses.replace(params.config, **overrides)
    forward = _forward(params_lib.Params(weights=params.weights, config=cfg))
    rows = []
    for rec in records:
      hazy, gt = folders.load_pair(rec)
      start = time.time()
      y, diags = jax.device_get(forward(jnp.asarray(hazy[None], jnp.float32) / 255.0))
      seconds = time.time() - start
      psnr, ssim = metrics.dehazing_scores(y[0] * 255.0, gt.astype(np.float32))
      blocks = [{"steps": int(s[0]), "residual": float(r[0]),
                 "history": [float(v) for v in h[0]]} for s, r, h in diags]
      rows.append({"image": rec.key, "psnr": psnr, "ssim": ssim, "seconds": seconds,
                   "blocks": blocks})
      print(f"{name:<9} {rec.key:<8} {psnr:7.3f} dB {ssim:.5f}  steps "
            f"{[b['steps'] for b in blocks]}  residuals "
            f"{['%.2e' % b['residual'] for b in blocks]}  {seconds:.1f}s", flush=True)
    results[name] = {"label": label, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in overrides.items()},
                     "rows": rows}
    json_path.write_text(json.dumps(results, indent=1) + "\n")
  curves = {name: [b["history"] for b in row["blocks"]] for name, res in results.items()
            for row in res["rows"] if row["image"] == plot_image}
  plot_curves(curves, results, plot_image, out_dir / "solvers_residuals.png")
  return results


def plot_curves(curves, results, image_key, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not curves:
    return
  num_blocks = len(next(iter(curves.values())))
  fig, axes = plt.subplots(1, num_blocks, figsize=(4.2 * num_blocks, 3.6), sharey=True)
  for b, ax in enumerate(np.atleast_1d(axes)):
    for name, blocks in curves.items():
      h = np.asarray(blocks[b], np.float64)
      ax.semilogy(np.arange(1, len(h) + 1), h, ".-", ms=3, label=results[name]["label"])
    ax.set_title(f"IM-block {b + 1} on {image_key}")
    ax.set_xlabel("map evaluation j")
    ax.grid(True, which="both", alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("relative residual ||T(g)-g|| / ||T(g)||")
  np.atleast_1d(axes)[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown_table(results) -> str:
  lines = ["| solver | images | mean PSNR (dB) | mean SSIM | mean steps per block | "
           "blocks at rtol 1e-3 | geo-mean final residual per block |",
           "|---|---|---|---|---|---|---|"]
  for name, res in results.items():
    rows = res["rows"]
    steps = np.mean([[b["steps"] for b in r["blocks"]] for r in rows], axis=0)
    resid = np.exp(np.mean(np.log([[b["residual"] for b in r["blocks"]] for r in rows]), axis=0))
    converged = sum(b["residual"] <= 1e-3 for r in rows for b in r["blocks"])
    total = sum(len(r["blocks"]) for r in rows)
    lines.append(f"| {res['label']} | {len(rows)} | {np.mean([r['psnr'] for r in rows]):.3f} | "
                 f"{np.mean([r['ssim'] for r in rows]):.5f} | "
                 f"{' / '.join(f'{s:.1f}' for s in steps)} | {converged}/{total} | "
                 f"{' / '.join(f'{v:.1e}' for v in resid)} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/stability"))
  parser.add_argument("--images", nargs="*", default=None, help="SOTS keys (default: all)")
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--stability-image", default="1400_1")
  parser.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                      help="centre crop for the stability analysis (default: full image)")
  parser.add_argument("--radius-iters", type=int, default=200)
  parser.add_argument("--arnoldi-iters", type=int, default=40)
  parser.add_argument("--norm-iters", type=int, default=40)
  parser.add_argument("--operating-point", choices=["released", "anderson"], default="released",
                      help="linearise at the released T = 8 outputs, or at Anderson's solution "
                           "(the 'anderson' config); the latter writes into OUT/at_anderson")
  parser.add_argument("--skip-stability", action="store_true")
  parser.add_argument("--skip-psnr", action="store_true")
  args = parser.parse_args()
  try:  # Before the scoring, which can take minutes.
    stability.check_settings(radius_iters=args.radius_iters,
                             radius_window=max(args.radius_iters // 3, 1),
                             arnoldi_iters=args.arnoldi_iters, norm_iters=args.norm_iters)
  except ValueError as e:
    parser.error(f"--{str(e).replace('_', '-')}")

  args.out.mkdir(parents=True, exist_ok=True)
  params = convert.weights_from_checkpoint(args.shared / "weights" / "minet_its_official.pth")
  records = folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
  if args.images:
    wanted = set(args.images)
    records = [r for r in records if r.key in wanted]
    missing = wanted - {r.key for r in records}
    if missing:
      parser.error(f"no SOTS image(s) {sorted(missing)}")

  if not args.skip_stability:
    rec = next((r for r in folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
                if r.key == args.stability_image), None)
    if rec is None:
      parser.error(f"--stability-image: no SOTS image {args.stability_image!r}")
    hazy, _ = folders.load_pair(rec)
    if args.crop:
      h, w = args.crop
      if not (0 < h <= hazy.shape[0] and 0 < w <= hazy.shape[1]):
        parser.error(f"--crop {h} {w} does not fit the {hazy.shape[0]}x{hazy.shape[1]} image")
      hazy = image_io.centre_crop(hazy, h, w)
    start = time.time()
    point_params, point_dir = params, args.out
    if args.operating_point == "anderson":
      point_params = params_lib.Params(weights=params.weights, config=dataclasses.replace(
          params.config, **CONFIGS["anderson"][1]))
      point_dir = args.out / "at_anderson"
    report = stability.analyse_image(point_params, hazy, steps=32, radius_iters=args.radius_iters,
                                     radius_window=max(args.radius_iters // 3, 1),
                                     arnoldi_iters=args.arnoldi_iters,
                                     norm_iters=args.norm_iters)
    report["image"] = rec.key
    report["seconds"] = time.time() - start
    stability_report.write_report(report, point_dir)
    print("\n".join(stability.summary_lines(report)), flush=True)
    for i, b in enumerate(report["blocks"], 1):
      print(f"block {i}: Arnoldi eigenvalue {b['arnoldi_eigenvalue']} (rel. residual "
            f"{b['arnoldi_relative_residual']:.2g}), leading |Ritz| {b['arnoldi_leading_moduli']}, "
            f"power ratio {b['spectral_radius_power']:.4f}, Rayleigh {b['rayleigh_quotient']:.4f}")

  if not args.skip_psnr:
    results = run_solvers(params, records, args.configs, args.out, args.stability_image)
    print(markdown_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
