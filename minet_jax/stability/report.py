"""The written stability report: ``stability.json`` and one residual plot per IM-block.

Kept apart from the analysis (`minet_jax.stability`) because it needs matplotlib.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
# A bare Figure renders to files without pyplot's global state or a display backend.
from matplotlib.figure import Figure

from minet_jax.core import files


def plot_block(report: dict[str, Any], index: int, path: pathlib.Path) -> Figure:
  """Writes the residual-versus-iteration plot of one block, with the estimated rates
  for reference, to `path`; returns the figure."""
  history = np.asarray(report["residual_history"], np.float64)
  steps = np.arange(1, len(history) + 1)
  # Where the model's solve stopped on this stage (reports before that field: the T
  # of unrolled steps).
  t = report.get("operating_steps", report["iterations"])
  # The solved map's Jacobian: eta df/dg, times the stage fraction s for a stage block.
  s = report.get("stage_fraction", 1.0)
  jac = "eta df/dg" if s == 1.0 else f"{s:g} eta df/dg"
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  ax.semilogy(steps, history, "o-", ms=3, label="Picard residual ||g_{j+1}-g_j|| / ||g_{j+1}||")
  ok = np.isfinite(history) & (history > 0)
  if ok.any():
    # The asymptotic slope of Picard is rho: draw it over the last few residuals.
    last = int(np.flatnonzero(ok)[-1])
    rate = report["spectral_radius"]
    span = steps[max(last - 8, 0):last + 1]
    ax.semilogy(span, history[last] * rate ** (span - steps[last]), "--",
                label=f"slope rho({jac}) = {rate:.3g}")
    ax.set_ylim(history[ok].min() / 3, history[ok].max() * 3)
  if 0 < t <= len(history):
    ax.axvline(t, color="grey", lw=0.8, label=f"model's steps: {t} (operating point)")
  ax.plot([], [], " ", label=f"||{jac}||_2 = {report['spectral_norm']:.3g}")
  verdict = "holds" if report["theorem1_holds"] else "fails"
  ax.set_title(f"IM-block {index + 1} (dilation {report['dilation']}): "
               f"rho({jac}) = {report['spectral_radius']:.3g}, Theorem 1 {verdict}")
  ax.set_xlabel("iteration j")
  ax.set_ylabel("relative residual")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  # Written whole, and a link at `path` is replaced rather than written through.
  with files.replacing(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  return fig


def report_names(num_blocks: int) -> list[str]:
  """The files `write_report` writes for a model of ``num_blocks`` IM-blocks."""
  return ["stability.json"] + [f"block{i + 1}_residuals.png" for i in range(num_blocks)]


def write_report(report: dict[str, Any], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes ``stability.json`` and one residual plot per block; returns the paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  names = report_names(len(report["blocks"]))
  json_path = out / names[0]
  files.write_text(json_path, json.dumps(report, indent=1, allow_nan=True) + "\n")
  paths = [json_path]
  for i, (block, name) in enumerate(zip(report["blocks"], names[1:])):
    paths.append(out / name)
    plot_block(block, i, paths[-1])
  return paths
