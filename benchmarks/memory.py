"""Peak memory of `python -m minet_jax.dehaze` on large photos, and what XLA plans for it.

    python benchmarks/memory.py [--sizes 1354x900 2708x1800 4000x3000] [--whole-up-to 5]
        [--repeats 2] [--ckpt DIR] [--exact 1354x900]

For every WIDTHxHEIGHT it writes a synthetic photo (SOTS ``1400_1`` upscaled
bicubically when ``../shared`` is there, a smooth random image otherwise), dehazes
it with the CLI in a fresh process, strip path forced, and prints that process's
peak resident set size and wall time (the largest peak and the shortest time over
``--repeats`` runs: the peak varies by up to ~0.3 GB from run to run); with
``--whole-up-to MP`` photos up to that many megapixels are also run with
``--strip-rows 0`` (the whole image at once). Beside
each it prints XLA's compiled memory analysis (arguments + outputs + temporaries,
nothing executed): the largest stage of the strip path (`minet_jax.core.strips.stage_memory`)
and the whole-image program. ``--exact`` runs one image both ways in this process and
prints the largest difference ([0, 1] scale). Weights: ``--ckpt``, else the released
model converted from ``../shared``, else random weights of the released architecture.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import minet_jax
from minet_jax.core import strips

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("MINET_SHARED", ROOT.parent / "shared"))
GIB = 2**30


def parse_size(text: str) -> tuple[int, int]:
  """'WIDTHxHEIGHT' -> (height, width)."""
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
  return h, w


def synthetic_photo(path: pathlib.Path, height: int, width: int) -> None:
  """A hazy-looking RGB photo of the given size (upscaled SOTS sample if available)."""
  hazy = SHARED / "data" / "RESIDE" / "SOTS" / "indoor" / "hazy" / "1400_1.png"
  if hazy.is_file():
    image = Image.open(hazy).convert("RGB").resize((width, height), Image.BICUBIC)
  else:
    rng = np.random.default_rng(0)
    small = rng.uniform(0.3, 0.9, (max(height // 64, 2), max(width // 64, 2), 3))
    image = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height),
                                                                   Image.BICUBIC)
  image.save(path)


def checkpoint(arg: str | None, workdir: pathlib.Path) -> tuple[pathlib.Path, str]:
  """Checkpoint folder to use and a description of its weights."""
  if arg:
    return pathlib.Path(arg), arg
  official = SHARED / "weights" / "minet_its_official.pth"
  path = workdir / "minet_its"
  if official.is_file():
    from minet_jax import convert
    convert.convert(official, path)
    return path, "released ITS weights"
  minet_jax.save(minet_jax.init(seed=0), path)
  return path, "random weights of the released architecture"


# Runs `python -m minet_jax.dehaze ARGS` and reports the process's peak RSS at exit.
# VmHWM belongs to the address space the exec created; a child's ru_maxrss would
# instead start from its parent's (this script's) RSS at the fork.
_RUNNER = """
import atexit, runpy, sys
def report():
  hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
  sys.stderr.write("peak_rss_kib " + hwm.split()[1] + "\\n")
atexit.register(report)
sys.argv = ["minet_jax.dehaze"] + sys.argv[1:]
runpy.run_module("minet_jax.dehaze", run_name="__main__")
"""


def run_dehaze(ckpt: pathlib.Path, photo: pathlib.Path, out: pathlib.Path,
               strip_rows: int | None) -> tuple[float, float]:
  """Peak RSS (bytes) and wall seconds of one dehaze CLI process."""
  cmd = [sys.executable, "-c", _RUNNER, "--ckpt", str(ckpt), str(photo), "-o", str(out),
         "--no-progress"]
  if strip_rows is not None:
    cmd += ["--strip-rows", str(strip_rows)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True, check=False)
  wall = time.perf_counter() - start
  peak = [line for line in proc.stderr.splitlines() if line.startswith("peak_rss_kib ")]
  if proc.returncode != 0 or not peak:
    raise RuntimeError(f"dehaze failed on {photo}:\n{proc.stderr}")
  return int(peak[-1].split()[1]) * 1024.0, wall


def whole_image_compiled(cfg: minet_jax.ModelConfig, height: int, width: int) -> int:
  """Arguments + outputs + temporaries of the whole-image forward, compiled for one image."""
  params = jax.eval_shape(lambda: minet_jax.init(cfg))
  image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  forward = jax.jit(lambda p, x: minet_jax.model_from_params(p)(x))
  stats = forward.lower(params, image).compile().memory_analysis()
  return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=parse_size, nargs="+",
                      default=[(900, 1354), (1273, 1915), (1800, 2708), (3000, 4000)],
                      help="photo sizes as WIDTHxHEIGHT")
  parser.add_argument("--whole-up-to", type=float, default=0.0,
                      help="also run the whole-image path for photos up to this many MP")
  parser.add_argument("--repeats", type=int, default=1, help="runs per photo and path")
  parser.add_argument("--ckpt", help="checkpoint folder (default: the released weights)")
  parser.add_argument("--exact", type=parse_size, default=None,
                      help="WIDTHxHEIGHT to compare the strip path with the whole image")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix="minet_memory_") as tmp:
    workdir = pathlib.Path(tmp)
    ckpt, weights = checkpoint(args.ckpt, workdir)
    cfg = minet_jax.load_config(ckpt)
    print(f"weights: {weights}; {os.cpu_count()} CPU cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} GiB RAM; "
          f"jax {jax.__version__} ({jax.default_backend()})")
    if args.exact:
      h, w = args.exact
      params = minet_jax.load(ckpt)
      image = np.asarray(Image.open(_photo(workdir, h, w)), np.float32) / 255.0
      rows = strips.strip_rows_for(h, w)
      whole = np.asarray(minet_jax.apply(params, image, strip_rows=0))
      striped = np.asarray(minet_jax.apply(params, image, strip_rows=rows))
      print(f"exactness at {w}x{h}, strips of {rows} rows: max |strips - whole| = "
            f"{np.abs(striped - whole).max():.2e} ([0, 1] scale)")
      del params, whole, striped
    print(f"{'photo':>10} {'MP':>5} {'path':>7} {'rows':>5} {'peak RSS GiB':>13} "
          f"{'(GB)':>6} {'wall s':>7} {'XLA GiB':>8}  largest stage")
    for h, w in args.sizes:
      photo = _photo(workdir, h, w)
      mp = h * w / 1e6
      rows = strips.strip_rows_for(h, w)
      stages = strips.stage_memory(cfg, (1, h, w, 3), rows)
      largest = max(stages, key=stages.get)
      runs = [("strips", rows, stages[largest], largest)]
      if mp <= args.whole_up_to:
        runs.append(("whole", 0, whole_image_compiled(cfg, h, w), "one program"))
      for path, strip_rows, planned, note in runs:
        results = [run_dehaze(ckpt, photo, workdir / "out", strip_rows)
                   for _ in range(args.repeats)]
        rss, wall = max(r[0] for r in results), min(r[1] for r in results)
        print(f"{w:>5}x{h:<4} {mp:5.2f} {path:>7} {strip_rows or '-':>5} {rss / GIB:13.2f} "
              f"{rss / 1e9:6.2f} {wall:7.1f} {planned / GIB:8.2f}  {note}", flush=True)
  return 0


def _photo(workdir: pathlib.Path, height: int, width: int) -> pathlib.Path:
  path = workdir / f"hazy_{width}x{height}.png"
  if not path.exists():
    synthetic_photo(path, height, width)
  return path


if __name__ == "__main__":
  sys.exit(main())
