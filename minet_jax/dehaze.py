"""Dehazes one's own photos.

    python -m minet_jax.dehaze photo.jpg more_photos/ -o dehazed/   # the released model
    python -m minet_jax.dehaze --ckpt workdirs/its photo.jpg -o dehazed/ --compare
    python -m minet_jax.dehaze big.png -o out/ --tile 512 --overlap 64

``--ckpt`` names the weights: ``its`` (the default: the authors' released model,
downloaded once by `minet_jax.hub`), an authors' ``.pth`` file, a checkpoint folder or
a training workdir. Inputs are files or folders (``--recursive`` to descend); any
size, PNG/JPEG/..., grayscale, alpha, 16-bit and EXIF-rotated images are read by
`minet_jax.image_io.read_rgb`. Each result is written as
``OUTDIR/<stem>_dehazed.png`` (``--format jpg`` for JPEG; folder inputs keep their
sub-folders); ``--compare`` adds ``<stem>_dehazed_compare.png``, the input and the
result side by side. A grayscale input comes back in colour (the model always
returns RGB, with a slight tint); ``--keep-gray`` writes the luminance of the result
instead.

What is never done, and said instead on stderr:

* no existing file is replaced unless ``--overwrite`` is given, and never an input:
  such an output is refused, and nothing is ever written outside OUTDIR;
* in folders, files named like a result (``*<suffix>.png``, ``*<suffix>_compare.jpg``,
  ...) are skipped as earlier results, and when OUTDIR lies inside an input folder,
  the images under OUTDIR are not taken as inputs (name them to process them);
* a file that cannot be read or processed is reported and the others go on.

The exit code is 1 if any input was not processed (skipped earlier results do
not count), 2 when the model or the output folder cannot be used (nothing is
processed), and 130 after Ctrl-C (what was written is listed; writes are whole).
Images above 2 MP are processed exactly in bounded memory by running the
full-resolution layers in row strips (`minet_jax.core.strips`; ``--strip-rows``
sets the strip height, 0 turns it off); the progress bar then advances stage by
stage. ``--tile`` instead processes large images in independent overlapping tiles,
an approximation (see `minet_jax.tiling`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from minet_jax import image_io, tiling
from minet_jax.core import fixed_point as fp
from minet_jax.core.config import (ModelConfig, add_speed_arguments, checked_speed_changes,
                                   program_name, unused_speed_options, warnings_as_notes)

PathLike = str | os.PathLike
# Growth of the released model's peak memory per pixel on the strip path
# (docs/PRETRAINED.md: 2.16 GB at 4.9 MP, 4.65 GB at 12 MP): what a refused image is
# said to need, plus what a solve to tolerance holds (`strip_bytes_per_pixel`).
STRIP_BYTES_PER_PIXEL = 350.0


def strip_bytes_per_pixel(cfg: ModelConfig) -> float:
  """About how many bytes per input pixel dehazing with ``cfg`` takes on the strip path.

  The IM-block stages run on the whole feature map (a quarter of the pixels, ``features``
  channels): beyond the released model's figure, a solve to tolerance keeps more such
  maps. Counted from XLA's compiled memory (`strips.stage_memory`, 768 x 1024 and
  1536 x 2048, float32): its best-so-far answer one; Anderson with history m 4m - 1; a
  two-stage block 2 (Picard) or 2m (Anderson) for its first stage and base. Picard with
  best-so-far and two-stage blocks: 1.6x the released figure; Anderson (m = 5) 4.5x, and
  6.5x with both.
  """
  extra = 0
  if fp.stops_at_tolerance(cfg.solver):
    history = cfg.anderson_m if cfg.solver == "anderson" else 1
    extra += int(cfg.best_so_far) + (4 * history - 1 if cfg.solver == "anderson" else 0)
    extra += 2 * history if max(cfg.stages) > 1 else 0
  elif max(cfg.stages) > 1:
    extra += 2
  map_bytes = cfg.features * (4 if cfg.dtype == "float32" else 2) / 4  # per input pixel
  return STRIP_BYTES_PER_PIXEL + extra * map_bytes

FORMATS = ("png", "jpg")  # --format: file suffixes `image_io.write_image` writes.
COMPARE = "_compare"  # Appended to a result's stem for the side-by-side image.
DEFAULT_OVERLAP = 32  # Tile overlap in pixels, unless a quarter of the tile is less.
DEFAULT_BLEND = "cosine"
# Tiles below this many pixels get a note: 384 px tiles cost about 4 dB on SOTS, 256 px
# about 10 (docs/PRETRAINED.md, "Tiled mode").
SMALL_TILE = 512
# ITU-R BT.601 luma weights (what Pillow's convert("L") uses): --keep-gray's luminance.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass
class Job:
  """One input file and where its result (and side-by-side image) go."""
  source: pathlib.Path
  target: pathlib.Path
  compare: pathlib.Path | None = None

  def outputs(self) -> list[pathlib.Path]:
    return [self.target] + ([self.compare] if self.compare is not None else [])


@dataclasses.dataclass
class Outcome:
  written: list[pathlib.Path]
  failed: dict[str, str]  # input path -> why it was not processed
  # input path -> why it was left out: an earlier result, a file named twice, Ctrl-C
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  # input path -> how its IM-blocks were solved (models solved to a tolerance, untiled)
  solves: dict[str, str] = dataclasses.field(default_factory=dict)
  interrupted: bool = False  # Ctrl-C stopped the run; the images not reached are skipped


def check_suffix(suffix: str) -> None:
  """Raises ValueError unless ``suffix`` keeps every output a plain file name."""
  bad = [c for c in ("/", os.sep, os.altsep or "/", "\0") if c in suffix]
  if bad or suffix in (".", ".."):
    raise ValueError(f"--suffix {suffix!r} must be part of a file name (no path separators)")


def default_overlap(tile: int) -> int:
  """The overlap used when none is given: `DEFAULT_OVERLAP`, or a quarter of a smaller tile."""
  return min(DEFAULT_OVERLAP, tile // 4)


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def _result_endings(suffix: str) -> tuple[str, ...]:
  """How earlier results' names end, in every format (none for an empty suffix)."""
  if not suffix:
    return ()
  return tuple(f"{suffix}{extra}.{fmt}" for extra in ("", COMPARE) for fmt in FORMATS)


def plan(inputs: Sequence[PathLike], out_dir: PathLike, *, recursive: bool = False,
         suffix: str = "_dehazed", image_format: str = "png", compare: bool = False,
         overwrite: bool = False) -> tuple[list[Job], dict[str, str], dict[str, str]]:
  """(jobs, failed, skipped): what to do, what cannot be done and why, earlier results left out.

  Folders yield their images except files named like results (``*<suffix>.png``,
  ``*<suffix>_compare.jpg``, ...) and, when ``out_dir`` lies strictly inside the
  folder, files under ``out_dir``. A file named more than once (by itself and in its
  folder) is processed once, for its first mention. A job is refused when an output
  would leave ``out_dir``, replace an input, collide with another job's output, or
  replace a file that already exists (allowed with ``overwrite``, except inputs and
  folders).
  """
  check_suffix(suffix)
  if image_format not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {image_format!r}")
  out_dir = pathlib.Path(out_dir)
  try:
    out_resolved = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
      return [], {str(out_dir): "the output folder -o is an existing file"}, {}
  except (OSError, RuntimeError) as e:  # Too long a name, no access, a link loop, ...
    return [], {str(out_dir): f"the output folder -o cannot be used: {_why(e)}"}, {}
  endings = _result_endings(suffix)
  jobs: list[Job] = []
  failed: dict[str, str] = {}
  skipped: dict[str, str] = {}

  def job(source: pathlib.Path, folder: pathlib.Path) -> Job:
    stem = f"{source.stem}{suffix}"
    return Job(source, folder / f"{stem}.{image_format}",
               folder / f"{stem}{COMPARE}.{image_format}" if compare else None)

  def jobs_of(path: pathlib.Path) -> list[Job]:
    """One input's jobs; what it cannot do goes to ``failed``, earlier results to
    ``skipped``."""
    if path.is_dir():
      with os.scandir(path):  # Raises if the folder cannot be listed (glob would not).
        pass
      folder = path.resolve()
      out_below = out_resolved != folder and folder in out_resolved.parents
      walker = path.rglob("*") if recursive else path.glob("*")
      found = []
      for f in sorted(walker):
        if not image_io.is_image_entry(f):
          continue
        if f.name.endswith(endings):
          skipped[str(f)] = (f"named like an earlier result (*{suffix}[{COMPARE}]."
                             f"{'/'.join(FORMATS)}); "
                             "pass it by name to process it")
        elif out_below and _inside(f.resolve(), out_resolved):
          failed[str(f)] = (f"not processed: it lies inside the output folder {out_dir}; "
                            "pass it by name, or choose an -o outside the input folder")
        else:
          found.append(f)
      if not found and not any(_inside(pathlib.Path(k).resolve(), folder)
                               for k in (*skipped, *failed)):
        failed[str(path)] = "folder holds no images" + ("" if recursive else
                                                        " (use --recursive for sub-folders)")
      return [job(f, out_dir / f.relative_to(path).parent) for f in found]
    elif path.is_file():
      return [job(path, out_dir)]
    elif path.exists():
      failed[str(path)] = "not a regular file or folder (a device, FIFO or socket)"
    else:
      failed[str(path)] = "no such file or folder"
    return []

  for item in inputs:
    try:
      jobs += jobs_of(pathlib.Path(item))
    except (OSError, RuntimeError) as e:  # An input that cannot be looked into fails alone.
      failed[str(item)] = f"cannot read it: {_why(e)}"
  sources = {j.source.resolve() for j in jobs}
  seen: dict[pathlib.Path, pathlib.Path] = {}
  first_of: dict[pathlib.Path, pathlib.Path] = {}  # Each source's first mention.
  kept = []
  for one in jobs:
    source = one.source.resolve()
    if source in first_of:  # Named twice (a file and its folder): one result.
      if str(one.source) != str(first_of[source]):
        skipped[str(one.source)] = f"the same file as {first_of[source]}: processed once"
      continue
    first_of[source] = one.source
    try:
      problem = _output_problem(one, out_dir, out_resolved, sources, seen, overwrite)
    except (OSError, RuntimeError) as e:  # An output name too long, a link loop, ...
      problem = f"its output cannot be written: {_why(e)}"
    if problem:
      failed[str(one.source)] = problem
      continue
    seen.update((o.resolve(), one.source) for o in one.outputs())
    kept.append(one)
  return kept, failed, skipped


def _output_problem(one: Job, out_dir: pathlib.Path, out_resolved: pathlib.Path,
                    sources: set[pathlib.Path], seen: dict[pathlib.Path, pathlib.Path],
                    overwrite: bool) -> str | None:
  """Why `plan` refuses ``one``'s outputs, or None."""
  for output in one.outputs():
    target = output.resolve()
    if not _inside(target.parent, out_resolved):
      return f"its output {output} would be written outside {out_dir}"
    if target in sources:
      return f"its output {output} would overwrite an input file"
    if target in seen:
      return f"its output {output} is also an output of {seen[target]}; process them separately"
    if output.is_dir():
      return f"its output {output} is a folder; dehaze never replaces folders"
    if os.path.lexists(output) and not overwrite:
      return (f"its output {output} already exists; dehaze replaces files only with "
              "--overwrite (or choose another -o or --suffix)")
  return None


def _why(error: Exception) -> str:
  """A path error in a few words (Python 3.11's `Path.resolve` raises RuntimeError for a
  link loop, later versions OSError)."""
  return getattr(error, "strerror", None) or str(error)


def is_gray(image: np.ndarray) -> bool:
  """Whether an (H, W, 3) image has three equal channels (a grayscale photo)."""
  return bool(np.array_equal(image[..., 0], image[..., 1])
              and np.array_equal(image[..., 1], image[..., 2]))


def luminance(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) RGB in [0, 1] -> (H, W) luma (`LUMA` weights), in [0, 1]."""
  return np.clip(np.asarray(image, np.float32) @ LUMA, 0.0, 1.0)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
  """Two images of one size (H, W) or (H, W, 3), next to each other with a white gap."""
  if left.ndim != right.ndim:  # A gray result beside its (RGB-read) input.
    left, right = (x if x.ndim == 3 else np.repeat(x[..., None], 3, -1) for x in (left, right))
  white = np.ones(left.shape[:1] + (gap,) + left.shape[2:], np.float32)
  return np.concatenate([np.asarray(left, np.float32), white, np.asarray(right, np.float32)], 1)


def dehaze_image(params, image: np.ndarray, *, tile: int | None = None, overlap: int = 32,
                 blend: str = DEFAULT_BLEND, strip_rows: int | None = None,
                 progress: tiling.Progress | None = None,
                 solves: list | None = None) -> np.ndarray:
  """float32 RGB (H, W, 3) in [0, 1] -> dehazed float32 RGB in [0, 1].

  ``strip_rows`` is `minet_jax.apply`'s (None: strips above 2 MP, 0: never);
  ``progress(done, total)`` is called per tile with ``tile``, else per stage of the
  strip-wise forward (once for a whole-image forward). ``solves``, when a list and the
  image is not tiled, receives each IM-block's solve summary (`minet_jax.apply`).
  """
  import minet_jax  # Heavy import kept out of `--help`.

  def run(x, report=None, solves=None):
    x = np.ascontiguousarray(x, np.float32)
    return np.asarray(minet_jax.apply(params, x, strip_rows=strip_rows, progress=report,
                                      solves=solves))

  if tile:
    return tiling.tiled_apply(run, image, tile=tile, overlap=overlap, blend=blend,
                              progress=progress)
  return run(image, progress, solves)


class _StepBar:
  """A second progress bar, below the per-image one, for the steps of one image; shown
  only for images that take more than one step (strips, tiles)."""

  def __init__(self, unit: str):
    self.unit, self.bar = unit, None

  def __call__(self, done: int, total: int) -> None:
    if total <= 1:
      return
    if self.bar is None:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=f"  {self.unit}s", unit=self.unit, position=1,
                      leave=False, file=sys.stderr)
    self.bar.update(done - self.bar.n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def dehaze_files(params, inputs: Sequence[PathLike], out_dir: PathLike, *,
                 recursive: bool = False, tile: int | None = None, overlap: int | None = None,
                 blend: str = DEFAULT_BLEND, suffix: str = "_dehazed", image_format: str = "png",
                 compare: bool = False, keep_gray: bool = False, overwrite: bool = False,
                 progress: bool = True, strip_rows: int | None = None,
                 max_megapixels: float | None = image_io.DEFAULT_MAX_MEGAPIXELS) -> Outcome:
  """Dehazes every input image into ``out_dir``; failures are collected, not raised.

  Only files this call creates are written (see `plan`), or, with ``overwrite``, earlier
  files replaced; an output that appears meanwhile is refused unless ``overwrite``.
  ``overlap`` defaults to `default_overlap` of the tile. ``keep_gray`` writes the
  luminance of the result for an input whose three channels are equal. Images above
  ``max_megapixels`` (None: no limit) are refused from their header, before decoding.
  """
  jobs, failed, skipped = plan(inputs, out_dir, recursive=recursive, suffix=suffix,
                               image_format=image_format, compare=compare,
                               overwrite=overwrite)
  if overlap is None:
    overlap = default_overlap(tile or 0)
  protect = [j.source for j in jobs]
  written: list[pathlib.Path] = []
  solved: dict[str, str] = {}
  # A solve to tolerance can stop early or miss it: say so per image. (Tiles solve
  # separately, so a tiled run reports nothing.)
  report_solves = fp.stops_at_tolerance(params.config.solver) and not tile
  # What a refusal says the image would need: tiles hold whole-image sums, not features
  # (plus one tile's own pass, bounded by the tile).
  bytes_per_pixel = (image_io.READ_BYTES_PER_PIXEL + tiling.BYTES_PER_PIXEL if tile else
                     strip_bytes_per_pixel(params.config))
  iterator = jobs
  steps = None
  if progress:
    from tqdm import tqdm
    iterator = tqdm(jobs, desc="dehaze", unit="image", file=sys.stderr)
    steps = _StepBar("tile" if tile else "stage")
  interrupted = False
  started = 0  # Jobs begun; the one under way when Ctrl-C comes is not counted done.
  try:
    for job in iterator:
      started += 1
      try:
        image = image_io.read_rgb(job.source, max_megapixels=max_megapixels,
                                  bytes_per_pixel=bytes_per_pixel,
                                  limit_name="--max-megapixels")
        solves = [] if report_solves else None
        result = dehaze_image(params, image, tile=tile, overlap=overlap, blend=blend,
                              strip_rows=strip_rows, progress=steps, solves=solves)
        if solves:
          from minet_jax.core.api import describe_solves
          solved[str(job.source)] = describe_solves(solves, params.config)
        if keep_gray and is_gray(image):
          image, result = image[..., 0], luminance(result)
        images = [(job.target, result)]
        if job.compare is not None:
          images.append((job.compare, side_by_side(image, result)))
        for path, data in images:
          image_io.write_image(path, data, protect=protect, exclusive=not overwrite)
          written.append(path)
      except Exception as e:  # One bad file must not cost the others.
        failed[str(job.source)] = str(e) if isinstance(
            e, (image_io.ImageReadError, FileExistsError)) else f"{type(e).__name__}: {e}"
      finally:
        if steps is not None:
          steps.close()
  except KeyboardInterrupt:  # Keep the account of what was written (writes are whole).
    interrupted = True
    current = jobs[started - 1] if started else None
    if current is not None and str(current.source) not in failed:
      done = [path in written for path in current.outputs()]
      if any(done) and not all(done):
        failed[str(current.source)] = "interrupted while writing its outputs; not all written"
      elif not any(done):
        skipped[str(current.source)] = "not processed: interrupted"
    skipped.update((str(j.source), "not processed: interrupted") for j in jobs[started:])
  return Outcome(written, failed, skipped, solved, interrupted)


def parser() -> argparse.ArgumentParser:
  """The command line of ``minet-dehaze`` / ``python -m minet_jax.dehaze``."""
  p = argparse.ArgumentParser(
      prog=program_name("minet_jax.dehaze"),
      description="Dehaze images; writes <stem>_dehazed.png files into the output folder.")
  p.add_argument("inputs", nargs="+", help="image files and/or folders")
  p.add_argument("-o", "--out", required=True, help="output folder (created if needed)")
  p.add_argument("--ckpt", default="its",
                 help="the weights: 'its' (the authors' released model, downloaded once "
                      "into ~/.cache/minet_jax; the default), an authors' .pth file, a "
                      "checkpoint folder, or a training workdir")
  p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
  p.add_argument("--format", dest="image_format", default="png", choices=FORMATS,
                 help="output file format (default: %(default)s)")
  p.add_argument("--compare", action="store_true",
                 help="also write <stem>_dehazed_compare.<format>: input and result side "
                      "by side")
  p.add_argument("--keep-gray", action="store_true",
                 help="for a grayscale input, write the luminance of the result (one "
                      "channel) instead of the model's RGB output, which is slightly tinted")
  p.add_argument("--overwrite", action="store_true",
                 help="replace existing files in the output folder (never an input file)")
  p.add_argument("--tile", type=int, default=0,
                 help="process large images in overlapping TILE x TILE tiles, an "
                      "approximation (default: %(default)s, the whole image at once)")
  p.add_argument("--overlap", type=int, default=None,
                 help=f"tile overlap in pixels (default: {DEFAULT_OVERLAP}, or a quarter "
                      "of --tile when that is less)")
  p.add_argument("--blend", default=None, choices=tiling.BLENDS,
                 help=f"weighting across tile overlaps (default: {DEFAULT_BLEND})")
  p.add_argument("--strip-rows", type=int, default=None,
                 help="rows per strip of the exact strip-wise forward (default: "
                      "automatic above 2 MP; 0: whole image at once)")
  p.add_argument("--suffix", default="_dehazed",
                 help="appended to each output stem; files named *<suffix>.png in input "
                      "folders are taken for earlier results and skipped (default: "
                      "%(default)s)")
  p.add_argument("--max-megapixels", type=float, default=image_io.DEFAULT_MAX_MEGAPIXELS,
                 help="refuse larger images before decoding them (default %(default)g; "
                      f"the released model takes about {STRIP_BYTES_PER_PIXEL / 1e3:.2f} GB "
                      "of memory per megapixel, a model solved to a tolerance more, up to "
                      "several times with Anderson: a refusal names the model's own "
                      "figure); 0: no limit")
  add_speed_arguments(p)
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def main(argv: list[str] | None = None) -> int:
  p = parser()
  args = p.parse_args(argv)
  if not args.max_megapixels >= 0:
    p.error("--max-megapixels must be >= 0 (0: no limit)")
  if args.tile < 0:
    p.error(f"--tile must be >= 0, got {args.tile}")
  if args.overlap is not None and args.overlap < 0:
    p.error(f"--overlap must be >= 0, got {args.overlap}")
  if args.tile and args.overlap is not None and args.overlap >= args.tile:
    p.error(f"--overlap {args.overlap} must be smaller than --tile {args.tile}")
  try:
    check_suffix(args.suffix)
  except ValueError as e:
    p.error(str(e))
  if args.strip_rows is not None and args.strip_rows < 0:
    p.error("--strip-rows must be >= 0")
  from minet_jax import hub
  from minet_jax.core import files
  try:
    # Existing files there are plan's business (refused per image, or --overwrite).
    files.check_output_folder(args.out, overwrite=True, writes=(), what="-o")
    changes = checked_speed_changes(args)  # before a download
    with warnings_as_notes("dehaze: note: "):
      params = hub.resolve(args.ckpt, progress=not args.no_progress)
      params = params.replace_config(**changes)
  except (OSError, ValueError) as e:
    print(f"dehaze: error: {e}", file=sys.stderr)
    return 2
  note = unused_speed_options(changes, params.config)
  if note:
    print(f"dehaze: note: {note}", file=sys.stderr)
  if args.tile and fp.stops_at_tolerance(params.config.solver):
    print("dehaze: note: tiles are solved one by one; a tiled run reports no convergence",
          file=sys.stderr)
  if not args.tile and (args.overlap is not None or args.blend is not None):
    print("dehaze: note: --overlap and --blend apply to --tile only; this run is not tiled",
          file=sys.stderr)
  if args.tile and args.tile < SMALL_TILE:
    print(f"dehaze: note: {args.tile} px tiles change the result much on images larger "
          f"than a tile (on SOTS, 256 px tiles cost about 10 dB, 384 px about 4; "
          f"docs/PRETRAINED.md, \"Tiled mode\"): use the largest tile that fits",
          file=sys.stderr)
  outcome = dehaze_files(params, args.inputs, args.out, recursive=args.recursive,
                         tile=args.tile or None, overlap=args.overlap,
                         blend=args.blend or DEFAULT_BLEND,
                         suffix=args.suffix, image_format=args.image_format,
                         compare=args.compare, keep_gray=args.keep_gray,
                         overwrite=args.overwrite, progress=not args.no_progress,
                         strip_rows=args.strip_rows,
                         max_megapixels=args.max_megapixels or None)
  print(f"wrote {len(outcome.written)} file(s) to {args.out}")
  for source, how in outcome.solves.items():
    print(f"dehaze: {source}: IM-blocks {how}")
  for source, reason in outcome.skipped.items():
    print(f"dehaze: skipped: {source}: {reason}", file=sys.stderr)
  for source, reason in outcome.failed.items():
    print(f"dehaze: failed: {source}: {reason}", file=sys.stderr)
  if outcome.interrupted:
    print("dehaze: interrupted", file=sys.stderr)
    return 130  # As a shell reports a process stopped by SIGINT.
  return 1 if outcome.failed else 0


if __name__ == "__main__":
  sys.exit(main())
