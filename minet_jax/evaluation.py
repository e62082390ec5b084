"""Scores dehazing methods on paired hazy/clear images: MI-Net, the hazy input, DCP.

    report = evaluate("checkpoints/minet_its", "data/RESIDE/SOTS/indoor")
    print(report.table())

Data is a folder (RESIDE SOTS/ITS layout or any ``hazy/`` + ``gt/``/``clear/``
folder, see `minet_jax.data.folders`) or a built dataset name such as
``reside_sots/indoor`` (see `minet_jax.data.builders`). Each image is scored
with `minet_jax.metrics.dehazing_scores` (the published SOTS protocol: RGB
0..255, output clipped, larger ground truth centre-cropped). Every method is
compiled once per image shape ahead of time and run once untimed, so ``s/image`` is
steady-state run time; compilation is reported separately. MI-Net runs an image above
`minet_jax.core.strips.AUTO_PIXELS` (2 MP) in row strips, exactly and in bounded memory,
as `minet_jax.apply` does; such an image's time includes compiling the strips' stages at
each new size. An image that fails is recorded with its error and the rest are still
evaluated. Ctrl-C stops after the images scored so far, which are reported
(`EvaluationInterrupted`). When MI-Net's IM-blocks are solved to
a tolerance (a stable model, or ``--solver``), each image's row also records how: the
steps per block, the blocks whose solve missed the tolerance, and their residuals.

`main` is the command line: ``python evaluate.py`` in a checkout, ``minet-evaluate``
once installed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minet_jax.core import api, files, strips
from minet_jax.core import fixed_point as fp
from minet_jax import dcp, image_io, metrics
from minet_jax.core.config import (ModelConfig, add_speed_arguments, checked_speed_changes,
                                   unused_speed_options, warnings_as_notes)
from minet_jax.data import folders

# What ``out_dir`` receives: the per-image table and the whole report.
REPORT_FILES = ("per_image.csv", "results.json")
METHODS = ("minet", "hazy", "dcp")
PROTOCOL = ("PSNR/SSIM on RGB 0..255; output clipped to [0, 255] (not rounded); ground truth "
            "centre-cropped to the output size when larger; SSIM: 11x11 Gaussian window, "
            "sigma 1.5, K1 0.01, K2 0.03, population covariance, mean over RGB")


@dataclasses.dataclass
class Sample:
  """One evaluation pair; ``load`` returns (hazy, clear) uint8 RGB arrays."""
  key: str
  load: Callable[[], tuple[np.ndarray, np.ndarray]]
  hazy_path: pathlib.Path | None = None
  clear_path: pathlib.Path | None = None


@dataclasses.dataclass
class Row:
  """The score of one method on one image (``error`` set when it failed)."""
  key: str
  method: str
  psnr: float = math.nan
  ssim: float = math.nan
  seconds: float = math.nan
  error: str = ""
  # MI-Net solved to a tolerance: per IM-block, the map evaluations (a two-stage block's
  # both stages'; ``solve_stage_steps`` has each stage's), whether the solve met the
  # tolerance, and its last relative residual (empty otherwise; kept when the image
  # failed after its solves).
  solve_steps: tuple[int, ...] = ()
  solve_stage_steps: tuple[tuple[int, ...], ...] = ()
  solve_converged: tuple[bool, ...] = ()
  solve_residual: tuple[float, ...] = ()


# ------------------------------------------------------------------ data


_DATASET_PREFIXES = ("reside_sots", "reside_its", "paired_folder", "synthetic_haze")


def samples_from(data: str | os.PathLike, *, layout: str = "auto", split: str = "test",
                 data_dir: str | os.PathLike | None = None) -> list[Sample]:
  """Evaluation pairs from a folder, or from a built dataset name + split."""
  path = pathlib.Path(data).expanduser()
  if not path.exists() and str(data).split("/", 1)[0] in _DATASET_PREFIXES:
    from minet_jax.data import builders  # Deferred: TFDS imports take seconds.
    source = builders.load_source(str(data), split, data_dir)

    def make(i: int) -> Sample:
      def load():
        ex = source[i]
        return ex["hazy"], ex["clear"]
      return Sample(key=f"{i:05d}", load=load)

    return [make(i) for i in range(len(source))]
  records = folders.find_pairs(path, layout=layout)
  return [Sample(key=r.key, load=lambda r=r: folders.load_pair(r), hazy_path=r.hazy,
                 clear_path=r.clear) for r in records]


# ------------------------------------------------------------------ methods


def _minet_forward(params, x):
  return api.dehaze_batch(params, x[None])[0]


def _minet_forward_with_solves(params, x):
  y, solves = api.dehaze_batch_with_solves(params, x[None])
  return y[0], solves


class _Compiled:
  """A method compiled ahead of time for each image shape it meets."""

  def __init__(self, fn: Callable[[jax.Array], Any]):
    self._jitted = jax.jit(fn)
    self._cache: dict[tuple[int, ...], Any] = {}
    self.compile_seconds = 0.0

  def prepare(self, x: jax.Array) -> None:
    """Compiles for ``x``'s shape unless already done (kept out of the timings). The
    first compiled shape also runs once: a process's first run of compiled code starts
    its thread pools (about 0.8 s on a 2-core CPU), which is not the method's time."""
    if x.shape not in self._cache:
      start = time.perf_counter()
      self._cache[x.shape] = self._jitted.lower(x).compile()
      if len(self._cache) == 1:
        jax.block_until_ready(self._cache[x.shape](x))
      self.compile_seconds += time.perf_counter() - start

  def __call__(self, x: jax.Array) -> Any:
    self.prepare(x)
    return self._cache[x.shape](x)


class _MINet(_Compiled):
  """MI-Net on one image: compiled whole per image shape, as `_Compiled`, up to
  `strips.AUTO_PIXELS`; above, `api.apply`'s strip-wise forward (whose stages compile at
  each new size, inside the timed call): the whole-image program of a 20 MP photo would
  need about 30 GB. Returns ``(image, solves)`` when the blocks are solved to a
  tolerance (`build_methods`)."""

  def __init__(self, params):
    self.params = params
    self.solved = fp.stops_at_tolerance(params.config.solver)
    forward = _minet_forward_with_solves if self.solved else _minet_forward
    super().__init__(lambda x: forward(params, x))

  @staticmethod
  def _in_strips(x: jax.Array) -> bool:
    return strips.choose_strip_rows(x.shape[0], x.shape[1]) > 0

  def prepare(self, x: jax.Array) -> None:
    if not self._in_strips(x):
      super().prepare(x)

  def __call__(self, x: jax.Array) -> Any:
    if not self._in_strips(x):
      return super().__call__(x)
    solves: list[fp.SolveSummary] | None = [] if self.solved else None
    y = api.apply(self.params, x, solves=solves)
    return (y, solves) if self.solved else y


def build_methods(methods: Sequence[str], params=None,
                  dcp_config: dcp.DCPConfig | None = None) -> dict[str, Callable]:
  """name -> function from float32 RGB [0, 1] (H, W, 3) to the same, clipped.

  When ``params`` solve their IM-blocks to a tolerance (``config.solver`` not
  "unrolled"), "minet" returns ``(image, solves)`` instead: one
  `fixed_point.SolveSummary` per IM-block, with a batch axis of 1.
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
  out: dict[str, Callable] = {}
  for name in methods:
    if name == "minet":
      if params is None:
        raise ValueError("method 'minet' needs a checkpoint (--ckpt)")
      out[name] = _MINet(params)
    elif name == "hazy":
      out[name] = lambda x: x
    elif name == "dcp":
      cfg = dcp_config or dcp.DCPConfig()
      out[name] = _Compiled(lambda x: dcp.dehaze(x, cfg))
  return out


# ------------------------------------------------------------------ report


@dataclasses.dataclass
class Report:
  """Per-image rows and their per-method means."""
  rows: list[Row]
  methods: tuple[str, ...]
  failed: dict[str, str]  # image key -> error, for images that could not be read
  compile_seconds: dict[str, float]
  data: str = ""
  ckpt: str = ""
  # How MI-Net ran where it differs from exact float32 (e.g. {"precision": "default"}).
  settings: dict[str, str] = dataclasses.field(default_factory=dict)
  # How MI-Net's IM-blocks were solved: solver, rtol and atol (a solve to tolerance), the
  # steps or their cap per stage (max_steps) and the stages per block.
  solve: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Set when Ctrl-C stopped the run: (images scored, images found).
  interrupted: tuple[int, int] | None = None

  def summary(self) -> dict[str, dict[str, Any]]:
    out = {}
    for m in self.methods:
      ok = [r for r in self.rows if r.method == m and not r.error]
      out[m] = {
          "psnr": float(np.mean([r.psnr for r in ok])) if ok else math.nan,
          "ssim": float(np.mean([r.ssim for r in ok])) if ok else math.nan,
          "seconds_per_image": float(np.mean([r.seconds for r in ok])) if ok else math.nan,
          "images": len(ok),
          "failed": sum(1 for r in self.rows if r.method == m and r.error),
      }
      # Every image the model ran on, scored or not (a failed solve may fail an image).
      solved = [r for r in self.rows if r.method == m and r.solve_steps]
      if solved:
        out[m]["solves"] = sum(len(r.solve_converged) for r in solved)
        out[m]["solves_converged"] = sum(sum(r.solve_converged) for r in solved)
        out[m]["mean_steps_per_block"] = [
            float(v) for v in np.mean([r.solve_steps for r in solved], axis=0)]
    return out

  def failed_images(self) -> dict[str, str]:
    """Every image that failed, unread or failed by a method: its first error."""
    failed: dict[str, str] = {}
    for r in self.rows:
      if r.error:
        failed.setdefault(r.key, r.error if r.key in self.failed else f"{r.method}: {r.error}")
    return failed

  def table(self) -> str:
    names = {"minet": "MI-Net", "hazy": "hazy input", "dcp": "DCP"}
    lines = [f"{'method':<12} | {'PSNR (dB)':>9} | {'SSIM':>7} | {'s/image':>8} | images",
             f"{'-' * 12}-+-{'-' * 9}-+-{'-' * 7}-+-{'-' * 8}-+-------"]
    summary = self.summary()
    for m, s in summary.items():
      lines.append(f"{names.get(m, m):<12} | {s['psnr']:>9.2f} | {s['ssim']:>7.4f} | "
                   f"{s['seconds_per_image']:>8.3f} | {s['images']}"
                   + (f" ({s['failed']} failed)" if s["failed"] else ""))
    for m, s in summary.items():
      if "solves" in s and self.solve:
        lines.append(
            f"({names.get(m, m)} IM-blocks, {self.solve['solver']} to rtol "
            f"{self.solve['rtol']:g}"
            + (f", atol {self.solve['atol']:g}" if self.solve.get("atol") else "")
            + f": {s['solves_converged']}/{s['solves']} solves converged, "
            "mean steps per block " + " / ".join(f"{v:.1f}" for v in s["mean_steps_per_block"])
            + ")")
    compiled = ", ".join(f"{m} {t:.1f} s" for m, t in self.compile_seconds.items() if t > 0)
    if compiled:
      lines.append(f"(compilation, once per image shape, and a first run: not in s/image: "
                   f"{compiled})")
    if self.settings:
      lines.append("(MI-Net inexact: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
                   + ")")
    failed = self.failed_images()
    if failed:
      lines.append(f"{len(failed)} image(s) failed: " + ", ".join(sorted(failed)))
    if self.interrupted:
      lines.append("(interrupted: {} of {} images evaluated)".format(*self.interrupted))
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"data": self.data, "ckpt": self.ckpt, "minet_settings": self.settings,
            "minet_solve": self.solve, "protocol": PROTOCOL,
            "summary": self.summary(), "failed_images": self.failed_images(),
            "compile_seconds": self.compile_seconds,
            **({"interrupted": {"evaluated": self.interrupted[0], "found": self.interrupted[1]}}
               if self.interrupted else {}),
            "per_image": [dataclasses.asdict(r) for r in self.rows]}

  def write(self, out_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``per_image.csv`` and ``results.json`` into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = (out_dir / name for name in REPORT_FILES)
    # File names that are not UTF-8 (undecodable bytes held as surrogates) are written
    # back as the bytes they were; the JSON escapes them.
    with files.replacing(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                 errors="surrogateescape") as f:
      writer = csv.writer(f)
      writer.writerow(["image", "method", "psnr", "ssim", "seconds", "error", "solve_steps",
                       "solve_converged", "solve_residual", "solve_stage_steps"])
      for r in self.rows:
        writer.writerow([r.key, r.method, f"{r.psnr:.4f}", f"{r.ssim:.5f}", f"{r.seconds:.4f}",
                         r.error, " ".join(map(str, r.solve_steps)),
                         " ".join(str(c).lower() for c in r.solve_converged),
                         " ".join(f"{v:.3g}" for v in r.solve_residual),
                         " ".join("+".join(map(str, b)) for b in r.solve_stage_steps)])
    files.write_text(json_path, json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n")
    return csv_path, json_path


class EvaluationInterrupted(KeyboardInterrupt):
  """Ctrl-C during `evaluate`: ``report`` holds the images scored before it (and was
  written to ``out_dir`` when one was given)."""

  def __init__(self, report: Report):
    super().__init__("evaluation interrupted")
    self.report = report


# ------------------------------------------------------------------ the loop


def _image_and_solves(result) -> tuple[jax.Array, list[fp.SolveSummary]]:
  """A method's result as (image, IM-block solve summaries; empty when not solved)."""
  if isinstance(result, tuple):
    return result
  return result, []


def _solve_fields(solves: Sequence[fp.SolveSummary]) -> dict[str, tuple]:
  """`Row`'s solve fields from one image's `fixed_point.SolveSummary` per IM-block."""
  image = [s.at(0) for s in solves]
  return {"solve_steps": tuple(n for n, _, _ in image),
          "solve_stage_steps": tuple(tuple(n for n, _ in s.stages_at(0)) for s in solves),
          "solve_converged": tuple(st == fp.RESULTS.successful for _, st, _ in image),
          "solve_residual": tuple(r for _, _, r in image)}


def _progress(items: Sequence[Sample], enabled: bool) -> Iterator[Sample]:
  if not enabled:
    return iter(items)
  from tqdm import tqdm
  return iter(tqdm(items, desc="evaluate", unit="image", file=sys.stderr))


def _note(message: str, enabled: bool) -> None:
  if enabled:
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)
  else:
    print(message, file=sys.stderr)


def _evaluate_one(sample: Sample, fns: Mapping[str, Callable], rows: list[Row],
                  failed: dict[str, str], *, params, save_images, overwrite: bool,
                  progress: bool) -> None:
  """Scores every method on one pair: one `Row` each onto ``rows``, ``failed`` noting a
  pair that could not be read."""
  methods = tuple(fns)
  try:
    hazy, clear = sample.load()
  except Exception as e:  # One unreadable pair must not end the run.
    failed[sample.key] = f"{type(e).__name__}: {e}"
    _note(f"evaluate: skipping {sample.key}: {failed[sample.key]}", progress)
    rows += [Row(sample.key, m, error=failed[sample.key]) for m in methods]
    return
  x = jnp.asarray(hazy, jnp.float32) / 255.0
  protect = [p for p in (sample.hazy_path, sample.clear_path) if p is not None]
  for name, fn in fns.items():
    solve_fields: dict[str, tuple] = {}
    try:
      if isinstance(fn, _Compiled):
        fn.prepare(x)
      start = time.perf_counter()
      out, solves = _image_and_solves(jax.block_until_ready(fn(x)))
      seconds = time.perf_counter() - start
      # Kept on the row whether or not the image scores: a failed solve explains a
      # failed image.
      solve_fields = _solve_fields(solves)
      if solves and not all(solve_fields["solve_converged"]):
        _note(f"evaluate: {name} on {sample.key}: IM-blocks "
              f"{api.describe_solves(solves, params.config)}", progress)
      finite = np.isfinite(np.asarray(out))
      if not finite.all():
        # Clipping would turn inf into 255 and keep NaN: neither is a score of this method.
        raise FloatingPointError(f"the output holds {100 * (1 - finite.mean()):.3g}% NaN or "
                                 "infinite values")
      p, s = metrics.dehazing_scores(out * 255.0, clear)
      if math.isnan(p) or math.isnan(s):
        raise FloatingPointError(f"the scores are NaN (PSNR {p}, SSIM {s})")
      if save_images is not None:  # Before the row: an image not saved has failed.
        image_io.write_png(pathlib.Path(save_images) / name / f"{sample.key}.png",
                           np.asarray(out), protect=protect, exclusive=not overwrite)
      rows.append(Row(sample.key, name, p, s, seconds, **solve_fields))
    except Exception as e:
      message = f"{type(e).__name__}: {e}"
      rows.append(Row(sample.key, name, error=message, **solve_fields))
      _note(f"evaluate: {name} failed on {sample.key}: {message}", progress)
      if os.environ.get("MINET_DEBUG"):
        traceback.print_exc()


def evaluate(ckpt: str | os.PathLike | None, data: str | os.PathLike, *,
             methods: Sequence[str] = METHODS, out_dir: str | os.PathLike | None = None,
             save_images: str | os.PathLike | None = None, limit: int | None = None,
             layout: str = "auto", split: str = "test",
             data_dir: str | os.PathLike | None = None,
             dcp_config: dcp.DCPConfig | None = None,
             config_changes: Mapping[str, Any] | None = None, progress: bool = True,
             overwrite: bool = False, notes_for_warnings: bool = False) -> Report:
  """Evaluates ``methods`` on the pairs in ``data``; see the module docstring.

  Args:
    ckpt: the weights, for "minet": a release name ("its", downloaded once), an
      authors' .pth, a checkpoint folder or a training workdir (`minet_jax.hub.resolve`).
    data: a paired folder, or a built dataset name (with ``split``, ``data_dir``).
    methods: any of "minet", "hazy", "dcp", in table order.
    out_dir: if set, ``per_image.csv`` and ``results.json`` are written there; checked
      before any image is scored (ValueError when it cannot be written, or already
      holds them and ``overwrite`` is False).
    save_images: if set, outputs go to ``<save_images>/<method>/<image>.png``; images
      there already are refused before any is scored unless ``overwrite``.
    limit: evaluate only the first ``limit`` pairs (>= 0).
    layout: folder layout for `minet_jax.data.folders.find_pairs`.
    config_changes: `ModelConfig` fields to run MI-Net with instead of the checkpoint's,
      e.g. ``{"precision": "default"}`` (`minet_jax.Params.replace_config`).
    notes_for_warnings: print the warnings of loading the model (a setting that will run
      badly) as this report's notes on stderr, as the command line does; otherwise they
      stay Python warnings.

  Raises:
    EvaluationInterrupted: on Ctrl-C (KeyboardInterrupt), with the report of the images
      scored before it, written to ``out_dir`` first.
  """
  methods = tuple(methods)
  if not methods:
    raise ValueError(f"no method to evaluate; choose from {','.join(METHODS)}")
  # Checked before the work: a report that cannot be written would be lost at the end.
  if out_dir is not None:
    files.check_output_folder(out_dir, overwrite=overwrite, writes=REPORT_FILES)
  if save_images is not None:  # The images it would replace are checked once known.
    files.check_output_folder(save_images, overwrite=True, what="--save-images")
    root, target = pathlib.Path(data).resolve(), pathlib.Path(save_images).resolve()
    if root.is_dir() and (target == root or root in target.parents):
      raise ValueError(f"--save-images {save_images} lies inside the data folder {data}: "
                       "what it writes would be read as data on the next run; choose a "
                       "folder outside it")
  if limit is not None and limit < 0:
    raise ValueError(f"--limit must be >= 0, got {limit}")
  params = None
  if "minet" not in methods and (ckpt is not None or config_changes):
    _note(f"evaluate: note: the model options (--ckpt and the speed and solve options) "
          f"apply to method 'minet' only, not to {','.join(methods)}", progress)
  if "minet" in methods:
    if ckpt is None:
      raise ValueError("method 'minet' needs a checkpoint: --ckpt its (the released "
                       "weights), a training workdir or checkpoint folder, or a .pth file")
    from minet_jax import hub
    with (warnings_as_notes("evaluate: note: ", say=lambda text: _note(text, progress))
          if notes_for_warnings else contextlib.nullcontext()):
      params = hub.resolve(ckpt, progress=progress)
      params = params.replace_config(**(config_changes or {}))
    note = unused_speed_options(config_changes or {}, params.config)
    if note:
      _note(f"evaluate: note: {note}", progress)
  fns = build_methods(methods, params, dcp_config)
  samples = samples_from(data, layout=layout, split=split, data_dir=data_dir)
  if limit is not None:
    samples = samples[:limit]
  if not samples:
    raise ValueError(f"no image pairs found in {data}" + (" (--limit 0)" if limit == 0 else ""))
  if save_images is not None:
    files.check_output_folder(save_images, overwrite=overwrite, what="--save-images",
                              writes=[f"{m}/{s.key}.png" for m in methods for s in samples])
  rows: list[Row] = []
  failed: dict[str, str] = {}
  done = 0
  try:
    for sample in _progress(samples, progress):
      _evaluate_one(sample, fns, rows, failed, params=params, save_images=save_images,
                    overwrite=overwrite, progress=progress)
      done += 1
  except KeyboardInterrupt:
    # Not the image it stopped in (one row per method each), nor what it saved of it.
    dropped = rows[done * len(fns):]
    del rows[done * len(fns):]
    if save_images is not None:
      for r in dropped:
        if not r.error:  # A row is added once its image is saved.
          with contextlib.suppress(OSError):  # The report comes first.
            (pathlib.Path(save_images) / r.method / f"{r.key}.png").unlink(missing_ok=True)
    failed = {k: v for k, v in failed.items() if any(r.key == k for r in rows)}
    interrupted = (done, len(samples))
  else:
    interrupted = None
  compile_seconds = {n: getattr(f, "compile_seconds", 0.0) for n, f in fns.items()}
  settings = {} if params is None else {
      k: v for k, v in (("precision", params.config.precision), ("dtype", params.config.dtype))
      if v != getattr(ModelConfig(), k)}
  solve = {}
  if params is not None:  # The tolerance only where the solver has one.
    cfg = params.config
    solve = {"solver": cfg.solver, **({"rtol": cfg.rtol, "atol": cfg.atol}
                                      if fp.stops_at_tolerance(cfg.solver) else {}),
             "max_steps": list(cfg.iterations), "stages": list(cfg.stages)}
  report = Report(rows, methods, failed, compile_seconds, str(data), str(ckpt or ""), settings,
                  solve, interrupted)
  if out_dir is not None:
    report.write(out_dir)
  if interrupted:
    raise EvaluationInterrupted(report)
  return report


def main(argv: list[str] | None = None) -> int:
  """`evaluate.py` and the ``minet-evaluate`` console script: prints the table; 2 on bad
  arguments or data, 1 when any image failed (the others are still scored), 130 after
  Ctrl-C (the table and ``--out`` of the images scored before it), else 0."""
  parser = argparse.ArgumentParser(
      description="Scores MI-Net, the hazy input and the dark channel prior on paired images.",
      epilog="--out DIR adds per_image.csv and results.json (with each image's IM-block "
             "steps, convergence and residuals when they are solved to a tolerance), "
             "--save-images DIR the outputs as PNG.")
  parser.add_argument("--ckpt", help="the weights: 'its' (the authors' released model, "
                      "downloaded once into ~/.cache/minet_jax), an authors' .pth file, a "
                      "checkpoint folder, or a training workdir")
  parser.add_argument("--data", required=True,
                      help="paired folder (SOTS/ITS layout, or hazy/ + gt/ or clear/) or a "
                           "built dataset name such as reside_sots/indoor")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated subset of minet,hazy,dcp (default: all)")
  parser.add_argument("--out", help="folder for per_image.csv and results.json")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the report files an --out folder already holds, and "
                           "the PNGs a --save-images folder holds")
  parser.add_argument("--save-images", help="folder for output PNGs (<method>/<image>.png)")
  parser.add_argument("--limit", type=int, help="evaluate only the first N (>= 0) pairs")
  parser.add_argument("--layout", default="auto", choices=("auto", "sots", "its", "paired"),
                      help="folder layout (default: detect)")
  parser.add_argument("--split", default="test", help="split of a dataset name (default: test)")
  parser.add_argument("--data-dir", help="where built datasets live (dataset names only)")
  add_speed_arguments(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  try:
    report = evaluate(
        args.ckpt, args.data, methods=methods, out_dir=args.out, save_images=args.save_images,
        limit=args.limit, layout=args.layout, split=args.split, data_dir=args.data_dir,
        config_changes=checked_speed_changes(args), progress=not args.no_progress,
        overwrite=args.overwrite, notes_for_warnings=True)
  except (ValueError, OSError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  except EvaluationInterrupted as e:
    print(e.report.table())
    written = f"; the report of those is in {args.out}" if args.out else ""
    print(f"evaluate: interrupted after {e.report.interrupted[0]} of "
          f"{e.report.interrupted[1]} images{written}", file=sys.stderr)
    return 130
  print(report.table())
  return 1 if any(r.error for r in report.rows) else 0


if __name__ == "__main__":
  sys.exit(main())
