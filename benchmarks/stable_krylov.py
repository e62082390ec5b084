"""Why Anderson solves the stable model's blocks in as many steps as Picard: a measurement.

    python benchmarks/stable_krylov.py --stable WORKDIR_OR_CHECKPOINT [--shared ../shared]
        [--images 1400_1 1402_9] [--iters 30] [--out docs/stability/stable_krylov.json]

For each SOTS sample and IM-block of the model (its blocks solved as it stores them):

1. the solver's steps (map evaluations) to rtol 1e-3 from the block input (z0 = g0),
   at most 100, with Picard and with Anderson (m = 5, beta = 1);
2. the block's stage solved far more tightly (Picard to a relative residual of 1e-6,
   at most 300 steps), and the map T linearised there: J = dT/dz;
3. from the solve's first residual r0 = T(g0) - g0, ``--iters`` Arnoldi steps of J,
   then, for k = 1..``--iters``, Picard's linearised residual ||J^k r0|| / ||r0|| and
   the smallest residual any Krylov method reaches in k steps
   (`spectral.krylov_residuals`: GMRES, a lower bound for Anderson with any history);
4. the map evaluations each needs to meet the solve's own stopping test,
   rtol * ||T(z*)|| (k updates and the evaluation that tests the k-th residual: the
   linearised estimate of what item 1 counts), and the outermost Ritz values, as
   modulus and angle: on a spectrum spread around the origin a Krylov method keeps
   Picard's rate; on a spectrum on one side of it, or with an outlying eigenvalue, it pulls
   ahead as the steps add up.

Prints a table and writes every figure to ``--out``. Full resolution, one image at a
time; about a minute per image and block on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax.core import fixed_point as fp
from minet_jax.core.params import Params, model_from_params
from minet_jax.data import folders
from minet_jax.stability import spectral

import stable_minet  # benchmarks/stable_minet.py: where ../shared is, model loading, scores

RTOL = 1e-3  # the stopping test the solvers are scored at (docs/STABILITY.md)
CAP = 100  # their step cap, as in stable_minet.py's convergence figures
TIGHT_RTOL = 1e-6  # the linearisation point: the stage solved far beyond RTOL
TIGHT_CAP = 300


def evaluations_to(residuals: np.ndarray, threshold: float) -> int | None:
  """Map evaluations a solve takes to meet ``threshold``, given its relative residual
  after k = 1, 2, ... updates (``residuals[k - 1]``, r0 being 1): the first k that meets
  it, plus one, for the evaluation that measures it (1 when r0 does); None if none."""
  curve = np.concatenate([[1.0], np.asarray(residuals, np.float64)])
  hits = np.flatnonzero(curve <= threshold)
  return int(hits[0]) + 1 if hits.size else None


def block_figures(params: Params, hazy: np.ndarray, iters: int) -> list[dict]:
  """Items 2-4 of the module docstring for every block of ``params`` on one image."""
  model = model_from_params(params)
  graphdef, state = nnx.split(model)
  x = jnp.asarray(hazy[None], jnp.float32) / 255.0
  runs = jax.jit(lambda s, x: nnx.merge(graphdef, s).solve_blocks(
      nnx.merge(graphdef, s).model_input(x)))(state, x)
  rows = []
  for block, run in zip(model.im_blocks, runs):
    t_map, f_state = block.map_fn()
    g0 = run.g0
    # Inputs as arguments, not constants folded into the compiled programs.
    t_jit = jax.jit(lambda z, g0, fs: t_map(z, (g0, fs)))
    jvp_jit = jax.jit(lambda v, z, g0, fs: jax.jvp(lambda q: t_map(q, (g0, fs)), (z,), (v,))[1])
    # The project's Picard, on from the stored solver's answer (same stopping test).
    tight = jax.jit(lambda z0, g0, fs: fp.fixed_point(
        t_map, fp.Picard(rtol=TIGHT_RTOL), z0, (g0, fs), max_steps=TIGHT_CAP, per_sample=True))
    result = tight(run.result.value, g0, f_state)
    z, rel = result.value, float(result.residual[0])

    def matvec(v, z=z, g0=g0):
      return jvp_jit(v, z, g0, f_state)

    r0 = t_jit(g0, g0, f_state) - g0
    r0_norm = float(jnp.linalg.norm(r0))
    if not r0_norm > 0.0:
      raise ValueError("a block's input is its own fixed point (zero first residual): "
                       "nothing to solve")
    picard, v = [], r0
    for _ in range(iters):
      v = matvec(v)
      picard.append(float(jnp.linalg.norm(v)) / r0_norm)
    hess = np.asarray(spectral.arnoldi(matvec, r0, num_iters=iters), np.float64)
    krylov = spectral.krylov_residuals(hess)
    ritz = np.linalg.eigvals(hess[:iters, :iters])
    ritz = ritz[np.argsort(-np.abs(ritz))]
    # The solve stops when ||T(z) - z|| <= rtol ||T(z)||; near the answer ||T(z)|| ~ ||z*||.
    threshold = RTOL * float(jnp.linalg.norm(z)) / r0_norm
    rows.append({
        "linearised_at_rel_residual": rel,
        "threshold": threshold,
        "picard_linear": picard,
        "krylov_best": krylov.tolist(),
        "picard_linear_steps": evaluations_to(np.array(picard), threshold),
        "krylov_best_steps": evaluations_to(krylov, threshold),
        "ritz_outer": [[float(abs(r)), float(np.degrees(np.angle(r)))] for r in ritz[:12]],
    })
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stable", type=pathlib.Path, required=True)
  parser.add_argument("--shared", type=pathlib.Path, default=stable_minet.DEFAULT_SHARED)
  parser.add_argument("--images", nargs="*", default=["1400_1", "1402_9"],
                      help="SOTS keys (default: 1400_1 1402_9)")
  parser.add_argument("--iters", type=int, default=30, help="Arnoldi and Picard steps")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.iters < 1:
    parser.error("--iters must be >= 1")
  sots = args.shared / "data/RESIDE/SOTS/indoor"
  if not sots.is_dir():
    parser.error(f"--shared: no SOTS samples under {sots}")
  try:
    params, step = stable_minet.load_stable(args.stable)
    stable_minet.one_stage_only(params, "the model")
  except (OSError, ValueError) as e:
    parser.error(f"--stable: {e}")
  records = {r.key: r for r in folders.find_sots_pairs(sots)}
  missing = [k for k in args.images if k not in records]
  if missing:
    parser.error(f"--images: no SOTS sample {', '.join(missing)} (have {', '.join(records)})")
  pairs = [(k, *folders.load_pair(records[k])) for k in args.images]

  solved = {}
  for solver in ("picard", "anderson"):
    print(f"{solver}, rtol {RTOL}:", flush=True)
    settings = stable_minet.with_solver(
        params, solver=solver, rtol=RTOL, atol=0.0, anderson_m=5, anderson_beta=1.0,
        best_so_far=True, iterations=(CAP,) * params.config.num_blocks)
    solved[solver] = stable_minet.scores(settings, pairs)["rows"]
  report = {"model": str(args.stable), "checkpoint_step": step, "iters": args.iters,
            "backend": jax.default_backend(), "rows": []}
  print("\n| image | block | Picard / Anderson steps | linearised: Picard / best Krylov steps "
        "| Picard / best Krylov residual at 5 | outer Ritz values (modulus, angle) |")
  print("|---|---|---|---|---|---|")
  for i, (key, hazy, _) in enumerate(pairs):
    for b, row in enumerate(block_figures(params, hazy, args.iters)):
      row = {"image": key, "block": b + 1, "picard_steps": solved["picard"][i]["steps"][b],
             "anderson_steps": solved["anderson"][i]["steps"][b], **row}
      report["rows"].append(row)
      at5 = min(5, args.iters) - 1
      ritz = ", ".join(f"{m:.2f} / {a:.0f}" for m, a in row["ritz_outer"][:4])
      print(f"| {key} | {b + 1} | {row['picard_steps']} / {row['anderson_steps']} | "
            f"{row['picard_linear_steps']} / {row['krylov_best_steps']} | "
            f"{row['picard_linear'][at5]:.1e} / {row['krylov_best'][at5]:.1e} | {ritz} |",
            flush=True)
  if args.out is not None:
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
