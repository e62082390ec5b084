"""Where the stable model's block radii come from: image size, and two ways to close the gap.

    python benchmarks/stable_radius.py --score WORKDIR [WORKDIR ...] [--out FILE.json]
    python benchmarks/stable_radius.py --sizes WORKDIR [--out FILE.json]
    python benchmarks/stable_radius.py --linear [--shrink 0.3] [--out FILE.json]
    python benchmarks/stable_radius.py --modes WORKDIR [--block 2] [--scales 1 0.75]
        [--crops 128 256] [--images 1402_9 ...] [--out FILE.json]

``--score``: each trained model (a training workdir or checkpoint) on the 10 SOTS samples
at full resolution with the solver it stores: PSNR / SSIM, solves converged, mean steps
per block, and rho(eta J) per block and image at the solver's answer, estimated by 30
power-iteration steps from the Picard residual (`contractive.block_radius`, the
estimate the training penalty uses, run longer). The quick version of
`stable_minet.py` for comparing training recipes.

``--sizes``: the same radius estimate on centre crops of 128 and 256 pixels and on the
whole image (SOTS ``1400_1`` and ``1403_8``, ITS ``1_1``): the stable model is trained
on crops, and its blocks' radii grow with the image they run on.

``--modes``: where a block's radius comes from on each SOTS sample at full resolution:
rho at the block's answer (60 power-iteration steps from the Picard residual, seeded by
the image's name) and the direction they converge to (the dominant mode), with the
share of that mode's energy on the pixels the hazy input saturates (all three channels
>= 250; one feature pixel per 2 x 2 input pixels, saturated when all four are) beside
the share of such feature pixels in the image;
``--scales`` also runs each image resized by those factors (bicubic), ``--crops`` square
crops at full resolution centred where the mode peaks, ``--images`` picks samples.

``--linear``: could one 1x1 linear map (64 x 64 plus a bias, shared by the three blocks,
foldable into the gate and deconv3 that read the block outputs) bring the
``--shrink``-scaled blocks' solutions back to the released model's block outputs?
Fitted by ridge regression on every pixel of the RESIDE ITS samples (and their mirror
images; never SOTS), then scored on SOTS with the released layers after the blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

import minet_jax
from minet_jax import convert, metrics
from minet_jax.core.params import Params, model_from_params
from minet_jax.data import folders
from minet_jax.image_io import centre_crop
from minet_jax.stability import contractive, spectral

import stable_minet  # benchmarks/stable_minet.py: the SOTS scoring, shared
import synthetic_saturation  # benchmarks/synthetic_saturation.py: what counts as saturated

RADIUS_STEPS = 30
SIZE_IMAGES = ("1400_1", "1403_8")
MODE_STEPS = 60


def radii(params: Params, images) -> np.ndarray:
  """rho estimate of every block at the stored solver's answer: (images, blocks)."""
  model = model_from_params(params)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x, key):
    m = nnx.merge(graphdef, state)
    runs = m.solve_blocks(m.model_input(x))
    keys = jax.random.split(key, len(runs))
    return [contractive.block_radius(block, r.g0, r.result.value, k, RADIUS_STEPS)[0]
            for block, r, k in zip(m.im_blocks, runs, keys)]

  return np.array([[float(r) for r in run(state, jnp.asarray(im[None], jnp.float32) / 255.0,
                                          jax.random.key(i))]
                   for i, im in enumerate(images)])


def score(source: str, pairs) -> dict:
  params = stable_minet.one_stage_only(minet_jax.load(source), str(source))
  print(f"{source}: {params.config.solver}, rtol {params.config.rtol}", flush=True)
  entry = stable_minet.scores(params, pairs)
  rho = radii(params, [hazy for _, hazy, _ in pairs])
  entry.update(rho=rho.tolist(), rho_below_1=int((rho < 1).sum()), rho_max=rho.max(0).tolist())
  print(f"  {entry['psnr']:.3f} dB {entry['ssim']:.5f}, converged {entry['converged']}/"
        f"{entry['solves']}, steps {np.round(entry['mean_steps'], 1).tolist()}, rho < 1 "
        f"{entry['rho_below_1']}/{rho.size}, max rho {np.round(rho.max(0), 3).tolist()}",
        flush=True)
  return entry


def sizes(source: str, pairs, shared: pathlib.Path) -> list[dict]:
  params = stable_minet.one_stage_only(minet_jax.load(source), str(source))
  its = folders.load_pair(folders.find_its_pairs(shared / "data/RESIDE/ITS")[0])[0]
  images = {k: h for k, h, _ in pairs if k in SIZE_IMAGES}
  images["ITS 1_1"] = its
  rows = []
  for name, image in images.items():
    for side in (128, 256, None):
      crop = image if side is None else centre_crop(image, side, side)
      rho = radii(params, [crop])[0]
      rows.append({"image": name, "size": list(crop.shape[:2]), "rho": rho.tolist()})
      print(f"  {name:<8} {crop.shape[0]}x{crop.shape[1]}: rho {np.round(rho, 3).tolist()}",
            flush=True)
  return rows


def modes(source: str, block: int, pairs, scales: tuple[float, ...] = (1.0,),
          crops: tuple[int, ...] = ()) -> list[dict]:
  params = stable_minet.one_stage_only(minet_jax.load(source), str(source))
  if not 1 <= block <= params.config.num_blocks:
    raise SystemExit(f"stable_radius: --block must be from 1 to {params.config.num_blocks}, "
                     f"got {block}")
  model = model_from_params(params)
  graphdef, state = nnx.split(model)

  @jax.jit
  def mode(state, x, key):
    m = nnx.merge(graphdef, state)
    run = m.solve_blocks(m.model_input(x))[block - 1]
    t_map, f_state = m.im_blocks[block - 1].map_fn()
    g = run.result.value
    matvec, _ = spectral.linearise(lambda z: t_map(z, (run.g0, f_state)), g)
    # From the residual, which the Picard steps have turned towards the dominant mode.
    start = contractive.residual_start(t_map(g, (run.g0, f_state)) - g,
                                       jax.random.normal(key, g.shape))
    found = spectral.spectral_radius(matvec, start, num_iters=MODE_STEPS,
                                     window=MODE_STEPS // 3)
    return found["radius"], jnp.sum(jnp.square(found["vector"][0]), axis=-1)

  rows = []
  for key, hazy, _ in pairs:
    for scale in scales:
      # Seeded by the name: an image gets the same start whichever others are run.
      rng = jax.random.key(zlib.crc32(key.encode()))
      rows.append(_mode_row(mode, state, key, resized(hazy, scale), rng, block, scale,
                            params.config.pad_mode))
      if scale != 1.0:
        continue
      # Crops at full resolution centred where the whole image's mode peaks.
      cy, cx = (2 * v for v in rows[-1]["peak"])
      for side in crops:
        top = int(np.clip(cy - side // 2, 0, max(hazy.shape[0] - side, 0))) // 2 * 2
        left = int(np.clip(cx - side // 2, 0, max(hazy.shape[1] - side, 0))) // 2 * 2
        row = _mode_row(mode, state, key, hazy[top:top + side, left:left + side], rng, block,
                        scale, params.config.pad_mode)
        rows.append({**row, "crop_origin": [top, left]})
  return rows


def resized(image: np.ndarray, scale: float) -> np.ndarray:
  """``image`` (uint8 HxWx3) scaled by ``scale``, bicubic."""
  if scale == 1.0:
    return image
  h, w = (max(16, round(side * scale)) for side in image.shape[:2])
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def _mode_row(mode, state, key: str, hazy: np.ndarray, rng: jax.Array, block: int,
              scale: float, pad_mode: str) -> dict:
  rho, energy = jax.device_get(mode(state, jnp.asarray(hazy[None], jnp.float32) / 255.0, rng))
  h, w = energy.shape
  # The encoder halves the image, an odd side padded by one row or column first
  # (model_input, config.pad_mode): pad the mask the same way.
  bright = synthetic_saturation.saturated(hazy)
  bright = np.pad(bright, ((0, 2 * h - bright.shape[0]), (0, 2 * w - bright.shape[1])),
                  mode=pad_mode)
  bright = bright.reshape(h, 2, w, 2).all(axis=(1, 3))
  row = {"image": key, "scale": scale, "size": list(hazy.shape[:2]),
         "rho": float(np.ravel(rho)[0]),
         # Where the mode's energy peaks, in feature pixels (half the image's).
         "peak": [int(v) for v in np.unravel_index(np.argmax(energy), energy.shape)],
         "mode_on_saturated": float(energy[bright].sum() / energy.sum()),
         "saturated": float(bright.mean())}
  print(f"  {key:<8} {hazy.shape[0]}x{hazy.shape[1]} block {block}: rho {row['rho']:.3f}, "
        f"mode energy on saturated pixels {row['mode_on_saturated']:.3f} (they are "
        f"{row['saturated']:.3f} of the image)", flush=True)
  return row


def linear(shrink: tuple[float, ...], pairs, shared: pathlib.Path) -> dict:
  released = convert.weights_from_checkpoint(shared / "weights/minet_its_official.pth")
  blocks = released.config.num_blocks
  student = stable_minet.shrunk(released, shrink * blocks if len(shrink) == 1 else shrink)
  t_def, t_state = nnx.split(model_from_params(released))
  s_def, s_state = nnx.split(model_from_params(student))

  @jax.jit
  def states(x):
    teacher, pupil = nnx.merge(t_def, t_state), nnx.merge(s_def, s_state)
    image = teacher.model_input(x)
    return ([r.output for r in teacher.solve_blocks(image)],
            [r.output for r in pupil.solve_blocks(image)])

  @jax.jit
  def output(block_outputs, x):
    m = nnx.merge(s_def, s_state)
    return jnp.clip(m.output_from_states(block_outputs, m.model_input(x), x.shape[1:3]), 0, 1)

  c = released.config.features
  xtx, xty = np.zeros((c + 1, c + 1)), np.zeros((c + 1, c))
  train = stable_minet.its_images(shared)
  for image in train + [im[:, ::-1] for im in train]:
    teacher, pupil = jax.device_get(states(jnp.asarray(np.ascontiguousarray(image)[None])))
    for t, s in zip(teacher, pupil):
      x = np.concatenate([s.reshape(-1, c), np.ones((s.size // c, 1))], 1).astype(np.float64)
      xtx += x.T @ x
      xty += x.T @ t.reshape(-1, c).astype(np.float64)
  ridge = 1e-3 * np.trace(xtx) / len(xtx)
  fit = np.linalg.solve(xtx + ridge * np.eye(len(xtx)), xty)
  rows = []
  for key, hazy, gt in pairs:
    x = jnp.asarray(hazy[None], jnp.float32) / 255.0
    _, pupil = states(x)
    mapped = [jnp.asarray(np.asarray(s).reshape(-1, c) @ fit[:c] + fit[c],
                          jnp.float32).reshape(s.shape) for s in pupil]
    row = {"image": key}
    for name, outs in (("scaled", pupil), ("scaled + linear map", mapped)):
      y = np.asarray(output(outs, x)[0]) * 255.0
      row[name] = metrics.dehazing_scores(y, gt.astype(np.float32))[0]
    rows.append(row)
    print(f"  {key:<8} {row['scaled']:.3f} dB -> {row['scaled + linear map']:.3f} dB", flush=True)
  means = {k: float(np.mean([r[k] for r in rows])) for k in ("scaled", "scaled + linear map")}
  print(f"  mean: {means}", flush=True)
  return {"shrink": list(shrink), "mean_psnr": means, "rows": rows}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--score", nargs="+", metavar="WORKDIR")
  mode.add_argument("--sizes", metavar="WORKDIR")
  mode.add_argument("--modes", metavar="WORKDIR")
  mode.add_argument("--linear", action="store_true")
  parser.add_argument("--block", type=int, default=2, help="--modes: the IM-block (from 1)")
  parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                      help="--modes: also run each image resized by these factors")
  parser.add_argument("--crops", type=int, nargs="+", default=[],
                      help="--modes: also run square crops of these sides at full "
                           "resolution, centred where the whole image's mode peaks")
  parser.add_argument("--images", nargs="+", default=None,
                      help="--modes: only these SOTS samples (default: all)")
  parser.add_argument("--shrink", type=stable_minet.shrink_factors, default=(0.3,))
  parser.add_argument("--shared", type=pathlib.Path, default=stable_minet.DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  records = folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
  pairs = [(r.key, *folders.load_pair(r)) for r in records]
  report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
  try:
    return _run(args, pairs, report)
  except ValueError as e:  # a model this script cannot analyse (`one_stage_only`)
    raise SystemExit(f"stable_radius: {e}") from None


def _run(args: argparse.Namespace, pairs: list, report: dict) -> int:
  """`main` after parsing: the mode asked for, written to ``--out``."""
  if args.score:
    report.setdefault("score", {}).update({s: score(s, pairs) for s in args.score})
  elif args.sizes:
    report["sizes"] = {"model": args.sizes, "rows": sizes(args.sizes, pairs, args.shared)}
  elif args.modes:
    if args.images:
      unknown = sorted(set(args.images) - {key for key, _, _ in pairs})
      if unknown:
        raise SystemExit(f"stable_radius: --images: no SOTS sample {', '.join(unknown)}")
      pairs = [p for p in pairs if p[0] in args.images]
    if not all(0 < s <= 1 for s in args.scales):
      raise SystemExit(f"stable_radius: --scales must be in (0, 1], got {args.scales}")
    if not all(16 <= c and c % 2 == 0 for c in args.crops):
      raise SystemExit(f"stable_radius: --crops must be even sides >= 16, got {args.crops}")
    report.setdefault("modes", {})[f"{args.modes} block {args.block}"] = modes(
        args.modes, args.block, pairs, tuple(args.scales), tuple(args.crops))
    report["mode_estimate"] = (f"{MODE_STEPS} power-iteration steps from the Picard residual "
                               "(contractive.residual_start), seeded by the image's name")
  else:
    report["linear"] = linear(args.shrink, pairs, args.shared)
  if not args.modes:
    report["radius_estimate"] = (f"{RADIUS_STEPS} power-iteration steps from the Picard "
                                 "residual (contractive.block_radius)")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
