"""The released MI-Net against the stable one, side by side on the SOTS samples.

    python benchmarks/stable_minet.py --stable WORKDIR_OR_CHECKPOINT [--shared ../shared]
        [--out docs/stability/stable_minet.json] [--images 1400_1 ...] [--radius-iters 40]
        [--skip-theorem] [--curve-image 1400_1] [--curve-steps 1,2,4,8]
        [--fixed-point-rtol 1e-6]
    python benchmarks/stable_minet.py --models --shrink 0.3 0.3,0.8,0.8 [--shrink-solver
        anderson] [--stage 0.3 0.3,0.5,0.5] --out docs/stability/stable_minet.json

For each model, on the SOTS indoor samples at full resolution (620x460):

1. PSNR / SSIM (`minet_jax.metrics.dehazing_scores`, the paper's protocol) with the
   solver the model was trained for (the released: 8 unrolled steps; the stable one:
   what its checkpoint stores), and the seconds per image of that forward pass (one
   process, same backend, warm, one image at a time);
2. per block and image, rho(J) (J: the Jacobian of the map the block solves, eta df/dg,
   or s eta df/dg for a block solving the stage of its step; power iteration, growth-rate estimate over the
   last third of ``--radius-iters`` steps, and the Arnoldi Ritz value; the larger of
   the two) and ||J||_2 (power iteration on J^T J) at the block's solution;
3. Picard and Anderson (m = 5) to rtol 1e-3, at most 100 steps: solves converged and
   mean steps per block;
4. with ``--time N``: both models' trained forward passes timed alternately, N times
   per image, in one process (the ratio the speed target is about);
5. PSNR against the number of iterations T (every block run for exactly T steps) on
   ``--curve-image``: the paper's Fig. 8 for both models (T in ``--curve-steps``,
   by default ``CURVE_STEPS``);
   with ``--fixed-point-rtol R``: every block solved again to rtol R (trained solver, at
   most ``--fixed-point-cap`` steps) and the figures of 2 at those points.

6. with ``--shrink``: the released weights with each block's f scaled (one factor, or
   one per block), untrained, scored as in 1 with their convergence: what the
   contraction margin alone costs; with ``--stage``: the same weights, untrained,
   each block solving the stage of its step at that fraction (`stage_fraction`).

Prints Markdown tables and writes everything to ``--out``, with the training step of the
stable model's weights (``checkpoint_step``: a workdir loads its best checkpoint by
synthetic validation PSNR, which need not be its last).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import minet_jax
from minet_jax import convert, metrics
from minet_jax.stability import spectral
from minet_jax.data import folders
from minet_jax.core import api, checkpoint
from minet_jax.core import fixed_point as fp
from minet_jax.core.params import Params, model_from_params

DEFAULT_SHARED = pathlib.Path(
    os.environ.get("MINET_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
CURVE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def shrink_factors(text: str) -> tuple[float, ...]:
  """``"0.3"`` or ``"0.3,0.8,0.8"`` -> the factors (argparse type of --shrink)."""
  try:
    factors = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
  if not all(s > 0 for s in factors):
    raise argparse.ArgumentTypeError(f"factors must be positive: {text!r}")
  return factors


def curve_steps(text: str) -> tuple[int, ...]:
  """``"1,2,4,8"`` -> (1, 2, 4, 8): distinct positive step counts (argparse type of
  --curve-steps)."""
  try:
    steps = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
  if not all(t >= 1 for t in steps) or len(set(steps)) != len(steps):
    raise argparse.ArgumentTypeError(f"step counts must be distinct and >= 1: {text!r}")
  return steps


def its_images(shared: pathlib.Path) -> list[np.ndarray]:
  """The RESIDE ITS samples of ``shared`` as model inputs (RGB [0, 1] float32, HxWx3):
  every hazy image, then each clear image once (never SOTS, the test set)."""
  pairs = [folders.load_pair(r) for r in folders.find_its_pairs(shared / "data/RESIDE/ITS")]
  clears = {clear.tobytes(): clear for _, clear in pairs}.values()
  return [im.astype(np.float32) / 255 for im in [h for h, _ in pairs] + list(clears)]


# One compiled program per (config, shape): the library's forward pass with its solve
# summaries, the one `minet_jax.apply(..., solves=[])` runs on a whole image.
_FORWARD = jax.jit(api.dehaze_batch_with_solves)


def forward(params: Params):
  """A jitted forward pass: clipped RGB [0, 1] and a `SolveSummary` per block."""
  return functools.partial(_FORWARD, params)


def with_solver(params: Params, **changes) -> Params:
  return Params(weights=params.weights, config=dataclasses.replace(params.config, **changes))


def scores(params: Params, pairs, *, time_it: bool = False) -> dict:
  run = forward(params)
  rows = []
  for key, hazy, gt in pairs:
    x = jnp.asarray(hazy[None], jnp.float32) / 255.0
    if time_it:
      jax.block_until_ready(run(x))  # compile and warm up on this shape
    start = time.perf_counter()
    y, diags = jax.device_get(run(x))
    seconds = time.perf_counter() - start
    psnr, ssim = metrics.dehazing_scores(y[0] * 255.0, gt.astype(np.float32))
    image = [d.at(0) for d in diags]
    rows.append({"image": key, "psnr": psnr, "ssim": ssim, "seconds": seconds,
                 "steps": [n for n, _, _ in image],
                 "converged": [st == fp.RESULTS.successful for _, st, _ in image],
                 "residual": [r for _, _, r in image]})
    print(f"  {key:<8} {psnr:7.3f} dB {ssim:.5f} steps {rows[-1]['steps']} "
          f"{seconds:.2f} s", flush=True)
  steps = np.array([r["steps"] for r in rows], np.float64)
  return {"psnr": float(np.mean([r["psnr"] for r in rows])),
          "ssim": float(np.mean([r["ssim"] for r in rows])),
          "seconds_per_image": float(np.median([r["seconds"] for r in rows])),
          "converged": int(sum(sum(r["converged"]) for r in rows)),
          "solves": int(steps.size), "mean_steps": steps.mean(axis=0).tolist(), "rows": rows}


def shrunk(released: Params, factors: tuple[float, ...], solver: str = "picard") -> Params:
  """The released weights with each block's f scaled by ``factors`` (one per block),
  untrained, solved by ``solver`` to rtol 1e-3, at most 30 steps, best-so-far answers:
  the model every "f scaled by" figure is measured on."""
  from minet_jax.train.state import shrink_blocks
  blocks = released.config.num_blocks
  return shrink_blocks(with_solver(released, solver=solver, rtol=1e-3, best_so_far=True,
                                   iterations=(30,) * blocks), factors)


def staged(released: Params, fractions: tuple[float, ...], solver: str = "picard") -> Params:
  """The released weights, untrained, with each block solving the stage of its step at
  ``fractions`` (`ModelConfig.stage_fraction`), by ``solver`` to rtol 1e-3, at most 30
  steps, best-so-far answers: the start of configs/stable.py."""
  blocks = released.config.num_blocks
  return with_solver(released, solver=solver, rtol=1e-3, best_so_far=True,
                     iterations=(30,) * blocks, stage_fraction=tuple(fractions))


def interleaved_seconds(models: dict[str, Params], pairs, repeats: int) -> dict:
  """Median seconds per image of each model's trained forward pass, timed alternately
  (model A, model B, A, B, ... on each image), so both see the same machine load."""
  runs = {name: forward(params) for name, params in models.items()}
  times: dict[str, list[float]] = {name: [] for name in models}
  for _, hazy, _ in pairs:
    x = jnp.asarray(hazy[None], jnp.float32) / 255.0
    for run in runs.values():
      jax.block_until_ready(run(x))  # compile and warm up
    for _ in range(repeats):
      for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_figures(block_def, radius_iters: int, block_state, g0, g, k):
  """rho (growth-rate estimate), the Arnoldi Hessenberg matrix and ||J||_2 of a block's
  stage map at ``g``. Jitted once per block graph, setting and shape: every image,
  stage and model with that block's shapes reuses the program."""
  t_map, f_state = nnx.merge(block_def, block_state).map_fn()
  matvec, rmatvec = spectral.linearise(lambda z: t_map(z, (g0, f_state)), g)
  k1, k2, k3 = jax.random.split(k, 3)
  radius = spectral.spectral_radius(matvec, jax.random.normal(k1, g.shape),
                                    num_iters=radius_iters, window=max(radius_iters // 3, 1))
  hess = spectral.arnoldi(matvec, jax.random.normal(k2, g.shape), num_iters=20)
  norm = spectral.spectral_norm(matvec, rmatvec, jax.random.normal(k3, g.shape),
                                num_iters=max(radius_iters // 2, 1))
  return radius["radius"], hess, norm["norm"]


def theorem1(params: Params, pairs, radius_iters: int) -> list[dict]:
  """rho(J) and ||J||_2 of every block at its solution, per image (J: the Jacobian of the
  map the block solves, eta df/dg, or s eta df/dg for a stage block); for a two-stage
  block the larger of its stages' figures, each stage's radius in ``stage_rho``."""
  model = model_from_params(params)
  graphdef, state = nnx.split(model)
  blocks = jax.jit(lambda s, x: nnx.merge(graphdef, s).solve_blocks(
      nnx.merge(graphdef, s).model_input(x)))
  out = []
  for i, (key, hazy, _) in enumerate(pairs):
    runs = blocks(state, jnp.asarray(hazy[None], jnp.float32) / 255.0)
    for b, (block, run) in enumerate(zip(model.im_blocks, runs)):
      block_def, block_state = nnx.split(block)
      stages = []
      keys = spectral.stage_keys(jax.random.key(100 * i + b), len(run.points))
      for (base, g), k in zip(run.points, keys):  # every stage's map at its solution
        radius, hess, norm = jax.device_get(
            _block_figures(block_def, radius_iters, block_state, base, g, k))
        stages.append((max(float(radius), spectral.ritz_summary(hess)["radius"]),
                       float(np.ravel(norm)[0])))
      rho, norm = max(r for r, _ in stages), max(n for _, n in stages)
      out.append({"image": key, "block": b + 1, "rho": rho, "norm": norm})
      if len(stages) > 1:
        out[-1]["stage_rho"] = [r for r, _ in stages]
      print(f"  {key:<8} block {b + 1}: rho {rho:.3f}  ||J|| {norm:.2f}"
            + (f" (stages {[round(r, 3) for r, _ in stages]})" if len(stages) > 1 else ""),
            flush=True)
  return out


def curve(params: Params, pair, steps: tuple[int, ...] = CURVE_STEPS) -> list[dict]:
  """PSNR on ``pair`` with every block run for exactly T steps, for each T in ``steps``."""
  _, hazy, gt = pair
  x = jnp.asarray(hazy[None], jnp.float32) / 255.0
  points = []
  for t in steps:
    cfg = with_solver(params, solver="unrolled", iterations=(t,) * params.config.num_blocks)
    y, _ = jax.device_get(forward(cfg)(x))
    psnr, _ = metrics.dehazing_scores(y[0] * 255.0, gt.astype(np.float32))
    points.append({"T": t, "psnr": psnr})
    print(f"  T = {t:>2}: {psnr:.3f} dB", flush=True)
  return points


def one_stage_only(params: Params, what: str) -> Params:
  """``params``, or ValueError naming ``what`` when it has two-stage blocks, for the
  scripts that linearise each block as one stage map with its input as the base."""
  if max(params.config.stages) > 1:
    raise ValueError(f"{what} has two-stage blocks (stages {list(params.config.stages)}); "
                     "this script analyses one-stage blocks")
  return params


def load_stable(path: pathlib.Path) -> tuple[Params, int | None]:
  """`minet_jax.load(path)` and the training step of the weights it read (in a training
  workdir, its best checkpoint unless that was refused); None for a converted folder
  or a .pth file."""
  if path.is_file():
    return minet_jax.load(path), None
  params, params_dir = checkpoint.load_with_source(path)
  return params, None if params_dir is None else int(params_dir.parent.name)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stable", type=pathlib.Path, default=None,
                      help="the stable model: a training workdir or a checkpoint folder")
  parser.add_argument("--models", nargs="*", default=["released", "stable"],
                      choices=["released", "stable"],
                      help="which to measure now; the others are kept from --out")
  parser.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--images", nargs="*", default=None, help="SOTS keys (default: all)")
  parser.add_argument("--radius-iters", type=int, default=40)
  parser.add_argument("--skip-theorem", action="store_true")
  parser.add_argument("--solvers", nargs="*", default=["picard", "anderson"],
                      choices=["picard", "anderson"],
                      help="solvers run to rtol 1e-3 for the convergence counts")
  parser.add_argument("--cap", type=int, default=100, help="their step cap per block")
  parser.add_argument("--shrink", nargs="*", type=shrink_factors, default=[],
                      metavar="S[,S2,S3]",
                      help="also score the released weights with each block's f scaled, "
                           "untrained, solved by --shrink-solver to rtol 1e-3 (<= 30 steps): "
                           "what the contraction margin alone costs; one factor for every "
                           "block or one per block (0.3,0.8,0.8)")
  parser.add_argument("--stage", nargs="*", type=shrink_factors, default=[],
                      metavar="S[,S2,S3]",
                      help="also score the released weights, untrained, with each block "
                           "solving the stage of its step at this fraction (stage_fraction), "
                           "by --shrink-solver to rtol 1e-3 (<= 30 steps)")
  parser.add_argument("--shrink-solver", default="picard", choices=["picard", "anderson"])
  parser.add_argument("--time", type=int, default=0, metavar="REPEATS",
                      help="also time both models' trained forward passes, interleaved, "
                           "REPEATS times per image (needs --stable)")
  parser.add_argument("--curve-image", default="1400_1")
  parser.add_argument("--curve-steps", type=curve_steps, default=CURVE_STEPS, metavar="T1,T2,...",
                      help="the numbers of iterations of the PSNR-against-T curve "
                           f"(default: {','.join(map(str, CURVE_STEPS))})")
  parser.add_argument("--fixed-point-rtol", type=float, default=0.0,
                      help="also solve every block to this tolerance with the trained solver "
                           "and give the Theorem-1 figures there (0: skip)")
  parser.add_argument("--fixed-point-cap", type=int, default=300)
  args = parser.parse_args()
  if args.fixed_point_rtol < 0 or args.fixed_point_cap < 1:
    parser.error("--fixed-point-rtol must be >= 0 and --fixed-point-cap >= 1")
  if args.radius_iters < 1:  # Checked now: the radii come after all the scoring.
    parser.error(f"--radius-iters must be >= 1, got {args.radius_iters}")
  for fractions in args.stage:
    try:  # The config's own check, before anything loads.
      minet_jax.ModelConfig(stage_fraction=fractions if len(fractions) > 1 else fractions[0])
    except ValueError as e:
      parser.error(f"--stage {','.join(f'{v:g}' for v in fractions)}: {e}")

  records = folders.find_sots_pairs(args.shared / "data/RESIDE/SOTS/indoor")
  if args.images:
    records = [r for r in records if r.key in args.images]
  pairs = [(r.key, *folders.load_pair(r)) for r in records]
  if "stable" in args.models and args.stable is None:
    parser.error("--stable is needed to measure the stable model")
  loaders = {
      "released": lambda: (convert.weights_from_checkpoint(
          args.shared / "weights" / "minet_its_official.pth"), None),
      "stable": lambda: load_stable(args.stable),
  }
  report: dict = {"images": [p[0] for p in pairs], "backend": jax.default_backend(),
                  "devices": str(jax.devices()[0])}
  if args.out and args.out.exists():
    kept = json.loads(args.out.read_text())
    # Everything measured before is kept (other models, shrinks, timings and their
    # history) unless this run measures it again.
    report.update({k: v for k, v in kept.items() if k not in report})
  report.setdefault("models", {})
  for name in args.models:
    params, step = loaders[name]()
    print(f"{name}: {params.config.solver}, T/cap {params.config.iterations}, "
          f"rtol {params.config.rtol}", flush=True)
    entry = report["models"].setdefault(name, {})
    entry["solve"] = params.config.solve_settings()
    entry["architecture"] = params.config.architecture()
    if name == "stable":
      # A workdir loads its best checkpoint (synthetic validation PSNR), which need not
      # be its last step: say which one was measured.
      entry["checkpoint_step"] = step
      print(f" weights of training step {entry['checkpoint_step']}", flush=True)

    def save():
      if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(" trained solver", flush=True)
    entry["trained_solver"] = scores(params, pairs, time_it=True)
    save()
    for solver in args.solvers:
      print(f" {solver} to rtol 1e-3, at most {args.cap} steps", flush=True)
      entry[solver] = scores(with_solver(params, solver=solver, rtol=1e-3, atol=0.0,
                                         iterations=(args.cap,) * params.config.num_blocks),
                             pairs)
      entry[solver]["cap"] = args.cap
      save()
    curve_pair = next((p for p in pairs if p[0] == args.curve_image), pairs[0])
    print(f" PSNR against T on {curve_pair[0]}", flush=True)
    entry["psnr_vs_T"] = curve(params, curve_pair, args.curve_steps)
    save()
    if not args.skip_theorem:
      print(" Theorem 1 at the solution of the trained solver", flush=True)
      entry["theorem1"] = theorem1(params, pairs, args.radius_iters)
      save()
    if args.fixed_point_rtol and params.config.solver == "unrolled":
      print(" --fixed-point-rtol: skipped, this model's solver runs a fixed number of steps",
            flush=True)
    elif args.fixed_point_rtol:
      # The trained tolerance leaves each block short of its fixed point, and block
      # Jacobians change over distances far below it; Theorem 1 is about the point itself.
      tight = with_solver(params, rtol=args.fixed_point_rtol, atol=0.0,
                          iterations=(args.fixed_point_cap,) * params.config.num_blocks)
      print(f" Theorem 1 at the fixed points: {tight.config.solver} to rtol "
            f"{args.fixed_point_rtol}, at most {args.fixed_point_cap} steps", flush=True)
      entry["fixed_point"] = {"rtol": args.fixed_point_rtol, "cap": args.fixed_point_cap,
                              "solves": scores(tight, pairs),
                              "theorem1": theorem1(tight, pairs, args.radius_iters)}
      save()

  for option, variant, what in (("shrink", shrunk, "f scaled by"),
                                ("stage", staged, "stage fraction")):
    for factors in getattr(args, option):
      released, _ = loaders["released"]()
      blocks = released.config.num_blocks
      factors = factors * blocks if len(factors) == 1 else factors
      if len(factors) != blocks:
        parser.error(f"--{option} needs 1 or {blocks} factors, got {factors}")
      name = ",".join(f"{s:g}" for s in factors)
      key = name if args.shrink_solver == "picard" else f"{args.shrink_solver}:{name}"
      print(f"released, {what} {name}, {args.shrink_solver} to rtol 1e-3", flush=True)
      report.setdefault(option, {})[key] = scores(variant(released, factors, args.shrink_solver),
                                                  pairs)
      if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
  if args.time:
    if args.stable is None:
      parser.error("--time needs --stable")
    print(f"timing, interleaved, {args.time} runs per image", flush=True)
    report["interleaved_seconds"] = interleaved_seconds(
        {name: load()[0] for name, load in loaders.items()}, pairs, args.time)
    print(f"  {report['interleaved_seconds']}", flush=True)
    if args.out:
      args.out.write_text(json.dumps(report, indent=1) + "\n")
  if set(report["models"]) != {"released", "stable"}:
    return 0
  seconds = report.get("interleaved_seconds") or {
      name: e["trained_solver"]["seconds_per_image"] for name, e in report["models"].items()}
  released_s = seconds["released"]
  print("\n| model | solver | PSNR (dB) | SSIM | s/image (x released) | Picard converged "
        "(mean steps) | Anderson converged (mean steps) | rho < 1 (at the answers; where the "
        "--fixed-point-rtol solves ended) | max rho | max norm |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, e in report["models"].items():
    t = e["trained_solver"]
    steps = lambda s: " / ".join(f"{x:.1f}" for x in s)  # noqa: E731
    th = e.get("theorem1", [])
    fixed = e.get("fixed_point", {}).get("theorem1", [])

    def solved(solver: str) -> str:  # "-" where this model was not run with the solver
      if solver not in e:
        return "-"
      return (f"{e[solver]['converged']}/{e[solver]['solves']} "
              f"({steps(e[solver]['mean_steps'])})")

    theorem = "- | - | -" if not th else (
        f"{sum(x['rho'] < 1 for x in th)}/{len(th)} "
        f"({sum(x['rho'] < 1 for x in fixed)}/{len(fixed)} after the tight solves) | "
        f"{max(x['rho'] for x in th):.3f} | {max(x['norm'] for x in th):.2f}")
    print(f"| {name} | {e['solve']['solver']} (T/cap {e['solve']['iterations'][0]}) | "
          f"{t['psnr']:.3f} | {t['ssim']:.5f} | {seconds[name]:.2f} "
          f"({seconds[name] / released_s:.2f}x) | {solved('picard')} | {solved('anderson')} | "
          f"{theorem} |")
  if all("psnr_vs_T" in e for e in report["models"].values()):
    # Models measured by other runs may have other curves: the rows are the T they share.
    curves = [{p["T"]: p["psnr"] for p in e["psnr_vs_T"]} for e in report["models"].values()]
    print("\nPSNR against T (" + args.curve_image + "): | T | "
          + " | ".join(report["models"]) + " |")
    for t in (t for t in curves[0] if all(t in c for c in curves)):
      print(f"| {t} | " + " | ".join(f"{c[t]:.3f}" for c in curves) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
