"""Dehazes one's own photos with a minet-jax checkpoint.

    python -m minet_jax.dehaze --ckpt checkpoints/minet_its photo.jpg more_photos/ -o dehazed/
    python -m minet_jax.dehaze --ckpt checkpoints/minet_its big.png -o out/ --tile 512 --overlap 64

Inputs are files or folders (``--recursive`` to descend); any size, PNG/JPEG/...,
grayscale, alpha, 16-bit and EXIF-rotated images are read by
`minet_jax.image_io.read_rgb`. Each result is written as
``OUTDIR/<stem>_dehazed.png`` (folder inputs keep their sub-folders).

What is never done, and said instead on stderr:

* no existing file is replaced (inputs, earlier results, anything else): such an
  output is refused, and nothing is ever written outside OUTDIR;
* in folders, files named like a result (``*<suffix>.png``) are skipped as
  earlier results, and when OUTDIR lies inside an input folder, the images
  under OUTDIR are not taken as inputs (name them to process them);
* a file that cannot be read or processed is reported and the others go on.

The exit code is 1 if any input was not processed (skipped earlier results do
not count). Images above 2 MP are processed exactly in bounded memory by running
the full-resolution layers in row strips (`minet_jax.strips`; ``--strip-rows``
sets the strip height, 0 turns it off). ``--tile`` instead processes large images
in independent overlapping tiles, an approximation (see `minet_jax.tiling`).
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
from minet_jax.config import add_speed_arguments, speed_changes

PathLike = str | os.PathLike
# Growth of dehazing's peak memory per pixel on the strip path (docs/PRETRAINED.md: 2.16 GB
# at 4.9 MP, 4.65 GB at 12 MP): what a refused image is said to need.
STRIP_BYTES_PER_PIXEL = 350.0


@dataclasses.dataclass
class Job:
  """One input file and where its result goes."""
  source: pathlib.Path
  target: pathlib.Path


@dataclasses.dataclass
class Outcome:
  written: list[pathlib.Path]
  failed: dict[str, str]  # input path -> why it was not processed
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # earlier results found


def check_suffix(suffix: str) -> None:
  """Raises ValueError unless ``suffix`` keeps every output a plain file name."""
  bad = [c for c in ("/", os.sep, os.altsep or "/", "\0") if c in suffix]
  if bad or suffix in (".", ".."):
    raise ValueError(f"--suffix {suffix!r} must be part of a file name (no path separators)")


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  return path == folder or folder in path.parents


def plan(inputs: Sequence[PathLike], out_dir: PathLike, *, recursive: bool = False,
         suffix: str = "_dehazed") -> tuple[list[Job], dict[str, str], dict[str, str]]:
  """(jobs, failed, skipped): what to do, what cannot be done and why, earlier results left out.

  Folders yield their images except files named like results (``*<suffix>.png``)
  and, when ``out_dir`` lies strictly inside the folder, files under ``out_dir``.
  A job is refused when its output would leave ``out_dir``, replace an input,
  collide with another job's output, or replace any file that already exists.
  """
  check_suffix(suffix)
  out_dir = pathlib.Path(out_dir)
  out_resolved = out_dir.resolve()
  result_name = f"{suffix}.png" if suffix else None
  jobs: list[Job] = []
  failed: dict[str, str] = {}
  skipped: dict[str, str] = {}
  if out_dir.exists() and not out_dir.is_dir():
    return [], {str(out_dir): "the output folder -o is an existing file"}, {}
  for item in inputs:
    path = pathlib.Path(item)
    if path.is_dir():
      folder = path.resolve()
      out_below = out_resolved != folder and folder in out_resolved.parents
      walker = path.rglob("*") if recursive else path.glob("*")
      files = []
      for f in sorted(walker):
        if not f.is_file() or f.name.startswith(".") or (
            f.suffix.lower() not in image_io.IMAGE_SUFFIXES):
          continue
        if result_name and f.name.endswith(result_name):
          skipped[str(f)] = (f"named like an earlier result (*{result_name}); "
                             "pass it by name to process it")
        elif out_below and _inside(f.resolve(), out_resolved):
          failed[str(f)] = (f"not processed: it lies inside the output folder {out_dir}; "
                            "pass it by name, or choose an -o outside the input folder")
        else:
          files.append(f)
      if not files and not any(_inside(pathlib.Path(k).resolve(), folder)
                               for k in (*skipped, *failed)):
        failed[str(path)] = "folder holds no images" + ("" if recursive else
                                                        " (use --recursive for sub-folders)")
      for f in files:
        rel = f.relative_to(path).parent
        jobs.append(Job(f, out_dir / rel / f"{f.stem}{suffix}.png"))
    elif path.is_file():
      jobs.append(Job(path, out_dir / f"{path.stem}{suffix}.png"))
    elif path.exists():
      failed[str(path)] = "not a regular file or folder (a device, FIFO or socket)"
    else:
      failed[str(path)] = "no such file or folder"
  sources = {j.source.resolve() for j in jobs}
  seen: dict[pathlib.Path, pathlib.Path] = {}
  kept = []
  for job in jobs:
    target = job.target.resolve()
    if not _inside(target.parent, out_resolved):
      failed[str(job.source)] = f"its output {job.target} would be written outside {out_dir}"
    elif target in sources:
      failed[str(job.source)] = f"its output {job.target} would overwrite an input file"
    elif target in seen:
      failed[str(job.source)] = (f"its output {job.target} is also the output of "
                                 f"{seen[target]}; process them separately")
    elif os.path.lexists(job.target):
      failed[str(job.source)] = (f"its output {job.target} already exists; dehaze never "
                                 "replaces a file (delete it, or choose another -o or --suffix)")
    else:
      seen[target] = job.source
      kept.append(job)
  return kept, failed, skipped


def dehaze_image(params, image: np.ndarray, *, tile: int | None = None, overlap: int = 32,
                 blend: str = "cosine", strip_rows: int | None = None) -> np.ndarray:
  """float32 RGB (H, W, 3) in [0, 1] -> dehazed float32 RGB in [0, 1].

  ``strip_rows`` is `minet_jax.apply`'s (None: strips above 2 MP, 0: never).
  """
  import minet_jax  # Heavy import kept out of `--help`.

  def run(x):
    x = np.ascontiguousarray(x, np.float32)
    return np.asarray(minet_jax.apply(params, x, strip_rows=strip_rows))

  if tile:
    return tiling.tiled_apply(run, image, tile=tile, overlap=overlap, blend=blend)
  return run(image)


def dehaze_files(params, inputs: Sequence[PathLike], out_dir: PathLike, *,
                 recursive: bool = False, tile: int | None = None, overlap: int = 32,
                 blend: str = "cosine", suffix: str = "_dehazed",
                 progress: bool = True, strip_rows: int | None = None,
                 max_megapixels: float | None = image_io.DEFAULT_MAX_MEGAPIXELS) -> Outcome:
  """Dehazes every input image into ``out_dir``; failures are collected, not raised.

  Only files this call creates are written (see `plan`); an output that appears
  meanwhile is refused too. Images above ``max_megapixels`` (None: no limit) are
  refused from their header, before decoding.
  """
  jobs, failed, skipped = plan(inputs, out_dir, recursive=recursive, suffix=suffix)
  protect = [j.source for j in jobs]
  written: list[pathlib.Path] = []
  iterator = jobs
  if progress:
    from tqdm import tqdm
    iterator = tqdm(jobs, desc="dehaze", unit="image", file=sys.stderr)
  for job in iterator:
    try:
      image = image_io.read_rgb(job.source, max_megapixels=max_megapixels,
                                bytes_per_pixel=STRIP_BYTES_PER_PIXEL,
                                limit_name="--max-megapixels")
      result = dehaze_image(params, image, tile=tile, overlap=overlap, blend=blend,
                            strip_rows=strip_rows)
      image_io.write_png(job.target, result, protect=protect, exclusive=True)
      written.append(job.target)
    except Exception as e:  # One bad file must not cost the others.
      failed[str(job.source)] = str(e) if isinstance(
          e, (image_io.ImageReadError, FileExistsError)) else f"{type(e).__name__}: {e}"
  return Outcome(written, failed, skipped)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m minet_jax.dehaze",
      description="Dehaze images with a minet-jax checkpoint; writes <stem>_dehazed.png files.")
  parser.add_argument("inputs", nargs="+", help="image files and/or folders")
  parser.add_argument("-o", "--out", required=True, help="output folder (created if needed)")
  parser.add_argument("--ckpt", required=True,
                      help="checkpoint folder (python -m minet_jax.convert model_ITS.pth DIR)")
  parser.add_argument("--recursive", action="store_true", help="descend into sub-folders")
  parser.add_argument("--tile", type=int, default=0,
                      help="tile size for large images (0: whole image at once)")
  parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
  parser.add_argument("--blend", default="cosine", choices=tiling.BLENDS,
                      help="weighting across tile overlaps")
  parser.add_argument("--strip-rows", type=int, default=None,
                      help="rows per strip of the exact strip-wise forward (default: "
                           "automatic above 2 MP; 0: whole image at once)")
  parser.add_argument("--suffix", default="_dehazed",
                      help="appended to each output stem; files named *<suffix>.png in input "
                           "folders are taken for earlier results and skipped")
  parser.add_argument("--max-megapixels", type=float, default=image_io.DEFAULT_MAX_MEGAPIXELS,
                      help="refuse larger images before decoding them (default %(default)g; "
                           f"dehazing takes about {STRIP_BYTES_PER_PIXEL / 1e3:.2f} GB of "
                           "memory per megapixel); 0: no limit")
  add_speed_arguments(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if not args.max_megapixels >= 0:
    parser.error("--max-megapixels must be >= 0 (0: no limit)")
  if args.tile < 0 or args.overlap < 0 or (args.tile and args.overlap >= args.tile):
    parser.error("--tile and --overlap must be >= 0, and --overlap smaller than --tile")
  try:
    check_suffix(args.suffix)
  except ValueError as e:
    parser.error(str(e))
  if args.strip_rows is not None and args.strip_rows < 0:
    parser.error("--strip-rows must be >= 0")
  import minet_jax
  try:
    params = minet_jax.load(args.ckpt)
    params = params.replace_config(**speed_changes(args))
  except (OSError, ValueError) as e:
    print(f"dehaze: error: {e}", file=sys.stderr)
    return 2
  outcome = dehaze_files(params, args.inputs, args.out, recursive=args.recursive,
                         tile=args.tile or None, overlap=args.overlap, blend=args.blend,
                         suffix=args.suffix, progress=not args.no_progress,
                         strip_rows=args.strip_rows,
                         max_megapixels=args.max_megapixels or None)
  print(f"wrote {len(outcome.written)} image(s) to {args.out}")
  for source, reason in outcome.skipped.items():
    print(f"dehaze: skipped: {source}: {reason}", file=sys.stderr)
  for source, reason in outcome.failed.items():
    print(f"dehaze: failed: {source}: {reason}", file=sys.stderr)
  return 1 if outcome.failed else 0


if __name__ == "__main__":
  sys.exit(main())
