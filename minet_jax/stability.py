"""Theorem 1 on real weights: is each IM-block's Picard map locally contractive?

Block i iterates g <- T(g) = g0 + eta * f_i(g). Near a point g the error of that
iteration evolves by the Jacobian J = eta * df_i/dg, so the iteration settles when
the spectral radius rho(J) < 1, which is the paper's Theorem 1 condition: every
eigenvalue lambda of df/dg has |lambda| < 1/eta. The spectral norm ||J||_2 >= rho(J)
bounds one step's contraction; ||J||_2 < 1 makes T a contraction in the plain L2
norm, while rho(J) < 1 only promises contraction eventually (for a non-normal J the
error can first grow).

Estimators (matrix-free; J is 4.6M x 4.6M for a 460x620 image):

* spectral radius: power iteration v <- Jv / ||Jv|| with forward-mode products
  (``jax.linearize``). The plain estimate ||J v_k|| converges to |lambda_max| when
  the dominant eigenvalue is real and unique; when it is a complex pair (or nearly
  tied) the per-step ratio oscillates. We therefore report the growth rate
  (||J^k v|| / ||J^(k-w) v||)^(1/w) over the last w steps (Gelfand's formula
  rho = lim ||J^k||^(1/k) applied to one generic vector, with the start-up
  transient dropped), which converges in both cases, beside the plain ratio and
  the Rayleigh quotient <v, Jv> (close to +-rho for a real dominant eigenvalue).
* spectral radius, second opinion: Arnoldi (a Krylov basis of J built from one
  random vector); the largest |Ritz value| converges to the outermost eigenvalue
  far faster than power iteration when eigenvalues crowd near the top, as they do
  here. Both estimators see only part of the spectrum and in practice approach rho
  from below, so the verdict uses the larger of the two.
* spectral norm: power iteration on J^T J (a jvp then a vjp, ``jax.linear_transpose``);
  ||J v|| for the final unit v is a lower bound that converges to ||J||_2.
* observed contraction: ratios r_{j+1}/r_j of successive Picard residuals. For a
  linear map they tend to rho(J); for MI-Net they are measured on the same block
  input g0 the model produced, by running Picard from g0 for ``steps`` steps.

The operating point is each block's output in the model as configured (for the
released model: after T = 8 steps). Where a block has not converged there is no
fixed point to linearise about; the estimate then describes the map where the
model actually uses it.

    python -m minet_jax.stability --ckpt checkpoints/minet_its \\
        --image ../shared/data/RESIDE/SOTS/indoor/hazy/1400_1.png --out stability/1400_1

writes ``stability.json`` and ``block<i>_residuals.png`` per block.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax import fixed_point as fp

Operator = Callable[[jax.Array], jax.Array]


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(_norm(x), jnp.finfo(jnp.float32).tiny)


def linearise(t_map: Callable[[jax.Array], jax.Array], g: jax.Array
              ) -> tuple[Operator, Operator]:
  """(J v, J^T w) for J = dT/dg at ``g``; T is linearised once and reused."""
  _, matvec = jax.linearize(t_map, g)
  transpose = jax.linear_transpose(matvec, g)
  return matvec, lambda w: transpose(w)[0]


def spectral_radius(matvec: Operator, v0: jax.Array, *, num_iters: int = 60,
                    window: int = 20) -> dict[str, jax.Array]:
  """Power-iteration estimates of rho(J) (see the module docstring).

  Returns a dict with ``radius`` (growth rate over the last ``window`` steps),
  ``radius_power`` (the last ||J v||), ``rayleigh`` (<v, Jv> for the last unit v)
  and ``ratios`` (||J v_k|| for every step k).
  """
  if num_iters < 1 or not 1 <= window <= num_iters:
    raise ValueError(f"need num_iters >= 1 and 1 <= window <= num_iters, got {num_iters}, "
                     f"{window}")

  def step(v, _):
    w = matvec(v)
    return _unit(w), (_norm(w), jnp.vdot(v.astype(jnp.float32), w.astype(jnp.float32)))

  _, (ratios, rayleighs) = jax.lax.scan(step, _unit(v0), None, length=num_iters)
  tail = jnp.log(jnp.maximum(ratios[-window:], jnp.finfo(jnp.float32).tiny))
  return {"radius": jnp.exp(jnp.mean(tail)), "radius_power": ratios[-1],
          "rayleigh": rayleighs[-1], "ratios": ratios}


def arnoldi(matvec: Operator, v0: jax.Array, *, num_iters: int = 30) -> jax.Array:
  """``num_iters`` Arnoldi steps from ``v0``: the (k+1) x k Hessenberg matrix.

  Classical Gram-Schmidt applied twice keeps the float32 basis orthogonal. The
  eigenvalues of its square part (Ritz values, `ritz_summary`) approach the
  outermost eigenvalues of J, complex pairs included, much faster than power
  iteration, at the cost of storing ``num_iters + 1`` vectors.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  k = num_iters
  basis = jnp.zeros((k + 1,) + v0.shape, jnp.float32).at[0].set(_unit(v0).astype(jnp.float32))
  hess = jnp.zeros((k + 1, k), jnp.float32)
  axes = tuple(range(v0.ndim))
  dot = functools.partial(jnp.tensordot, axes=(tuple(a + 1 for a in axes), axes),
                          precision=jax.lax.Precision.HIGHEST)
  comb = functools.partial(jnp.tensordot, axes=(0, 0), precision=jax.lax.Precision.HIGHEST)

  def step(j, carry):
    basis, hess = carry
    w = matvec(basis[j]).astype(jnp.float32)
    scale = _norm(w)
    h = dot(basis, w)  # Rows beyond j are still zero, so they project out nothing.
    w = w - comb(h, basis)
    h2 = dot(basis, w)
    w = w - comb(h2, basis)
    beta = _norm(w)
    # Breakdown (an invariant subspace was found): continue with zeros, which adds
    # only zero columns and leaves the Ritz values of the subspace untouched.
    alive = beta > 1e-5 * scale
    beta = jnp.where(alive, beta, 0.0)
    col = (h + h2).at[j + 1].set(beta)
    nxt = jnp.where(alive, w / jnp.maximum(beta, jnp.finfo(jnp.float32).tiny), 0.0)
    return basis.at[j + 1].set(nxt), hess.at[:, j].set(col)

  _, hess = jax.lax.fori_loop(0, k, step, (basis, hess))
  return hess


def ritz_summary(hess: np.ndarray) -> dict[str, Any]:
  """Outermost Ritz value of an Arnoldi Hessenberg matrix and its relative residual."""
  hess = np.asarray(hess, np.float64)
  k = hess.shape[1]
  values, vectors = np.linalg.eig(hess[:k, :k])
  top = int(np.argmax(np.abs(values)))
  radius = float(np.abs(values[top]))
  residual = float(abs(hess[k, k - 1]) * abs(vectors[-1, top]) / max(radius, 1e-30))
  return {"radius": radius, "eigenvalue": [float(values[top].real), float(values[top].imag)],
          "relative_residual": residual,
          "leading": sorted((float(abs(v)) for v in values), reverse=True)[:5]}


def spectral_norm(matvec: Operator, rmatvec: Operator, v0: jax.Array, *,
                  num_iters: int = 30) -> dict[str, jax.Array]:
  """Power iteration on J^T J: ``norm`` = ||J v|| for the last unit v, ``history`` per step."""
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")

  def step(v, _):
    jv = matvec(v)
    return _unit(rmatvec(jv)), _norm(jv)

  v, history = jax.lax.scan(step, _unit(v0), None, length=num_iters)
  norm = _norm(matvec(v))
  return {"norm": norm, "history": jnp.append(history, norm)}


# Relative residuals below this are float32 rounding noise, not contraction.
RESIDUAL_FLOOR = 1e-6


def observed_ratios(history: np.ndarray, floor: float = RESIDUAL_FLOOR) -> np.ndarray:
  """r_{j+1} / r_j over the finite part of a residual history above ``floor``."""
  r = np.asarray(history, np.float64)
  r = r[np.isfinite(r)]
  below = np.flatnonzero(r < floor)
  r = r[:below[0]] if below.size else r
  return r[1:] / np.maximum(r[:-1], np.finfo(np.float64).tiny)


def _geomean(x: np.ndarray) -> float:
  x = x[np.isfinite(x) & (x > 0)]
  return float(np.exp(np.mean(np.log(x)))) if x.size else float("nan")


def analyse_block(block: Any, g0: jax.Array, g: jax.Array, *, key: jax.Array,
                  steps: int = 32, radius_iters: int = 60, radius_window: int = 20,
                  arnoldi_iters: int = 30, norm_iters: int = 30) -> dict[str, Any]:
  """Theorem-1 figures of one `IMBlock` at the operating point ``g`` with input ``g0``.

  Args:
    block: an `minet_jax.model.IMBlock`.
    g0, g: the block's input and its output in the model (one image, NHWC, batch 1).
    key: PRNG key of the power iterations' start vectors.
    steps: Picard steps from g0 whose residuals give the observed contraction.
    radius_iters, radius_window, arnoldi_iters, norm_iters: estimator settings.
  """
  if g.shape[0] != 1:
    raise ValueError(f"analyse one image at a time (batch 1), got batch {g.shape[0]}")
  graphdef, state = nnx.split(block)

  @jax.jit
  def figures(state, g0, g, key):
    blk = nnx.merge(graphdef, state)
    t_map, f_state = blk.map_fn()
    matvec, rmatvec = linearise(lambda z: t_map(z, (g0, f_state)), g)
    k1, k2, k3 = jax.random.split(key, 3)
    radius = spectral_radius(matvec, jax.random.normal(k1, g.shape), num_iters=radius_iters,
                             window=radius_window)
    hess = arnoldi(matvec, jax.random.normal(k2, g.shape), num_iters=arnoldi_iters)
    norm = spectral_norm(matvec, rmatvec, jax.random.normal(k3, g.shape), num_iters=norm_iters)
    picard = fp.fixed_point(t_map, g0, (g0, f_state), max_steps=steps, solver="unrolled",
                            per_sample=True, unroll=1)
    return radius, hess, norm, picard.residual_history[0]

  radius, hess, norm, history = jax.device_get(figures(state, g0, g, key))
  ritz = ritz_summary(hess)
  ratios = observed_ratios(history)
  t = int(block.iterations)
  eta = float(block.eta)
  # Both estimators see only part of the spectrum and approach rho from below in
  # practice, so the verdict uses the larger of the two.
  rho = max(float(radius["radius"]), ritz["radius"])
  sigma = float(norm["norm"])
  return {
      "eta": eta,
      "iterations": t,
      "dilation": int(block.f.conv1.dilation),
      "spectral_radius": rho,
      "spectral_radius_growth": float(radius["radius"]),
      "spectral_radius_power": float(radius["radius_power"]),
      "rayleigh_quotient": float(radius["rayleigh"]),
      "spectral_radius_arnoldi": ritz["radius"],
      "arnoldi_eigenvalue": ritz["eigenvalue"],
      "arnoldi_relative_residual": ritz["relative_residual"],
      "arnoldi_leading_moduli": ritz["leading"],
      "spectral_norm": sigma,
      "max_abs_eigenvalue_df": rho / eta,
      "theorem1_bound": 1.0 / eta,
      "theorem1_holds": bool(rho < 1.0),
      "contraction_in_l2": bool(sigma < 1.0),
      # Residual ratios around the operating point (steps T/2..T) and at the end of the run.
      "observed_ratio_at_T": _geomean(ratios[max(t // 2 - 1, 0):max(t - 1, 1)]),
      "observed_ratio_tail": _geomean(ratios[-max(len(ratios) // 4, 1):]),
      "residual_at_T": float(history[t - 1]) if 0 < t <= len(history) else float("nan"),
      "residual_history": [float(x) for x in history],
      "power_ratios": [float(x) for x in radius["ratios"]],
      "norm_history": [float(x) for x in norm["history"]],
  }


def analyse_image(params: Any, image: np.ndarray, *, seed: int = 0,
                  **block_kwargs: Any) -> dict[str, Any]:
  """Runs the model on one image and `analyse_block` on every IM-block.

  Args:
    params: `minet_jax.Params`; its config decides the operating point (solver, T).
    image: HxWx3 RGB, uint8 or float in [0, 1].
    seed: seed of the power iterations.
    **block_kwargs: forwarded to `analyse_block`.
  """
  from minet_jax import api
  from minet_jax.params import model_from_params

  model = model_from_params(params)
  cfg = params.config
  x = api.to_float_rgb(image)
  h, w = x.shape[1:3]
  graphdef, state = nnx.split(model)

  @jax.jit
  def operating_points(state, x):
    m = nnx.merge(graphdef, state)
    return m.solve_blocks(m.model_input(x))

  runs = operating_points(state, x)
  keys = jax.random.split(jax.random.key(seed), len(runs))
  blocks = []
  for block, run, key in zip(model.im_blocks, runs, keys):
    report = analyse_block(block, run.g0, run.result.value, key=key, **block_kwargs)
    report["model_steps"] = int(run.result.num_steps[0])
    report["model_residual"] = float(run.result.residual[0])
    blocks.append(report)
  return {"config": cfg.to_dict(), "image_size": [int(h), int(w)], "blocks": blocks}


def plot_block(report: dict[str, Any], index: int, path: pathlib.Path) -> None:
  """Residual-versus-iteration plot of one block with the estimated rates for reference."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  history = np.asarray(report["residual_history"], np.float64)
  steps = np.arange(1, len(history) + 1)
  t = report["iterations"]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.semilogy(steps, history, "o-", ms=3, label="Picard residual ||g_{j+1}-g_j|| / ||g_{j+1}||")
  ok = np.isfinite(history) & (history > 0)
  if ok.any():
    # The asymptotic slope of Picard is rho: draw it over the last few residuals.
    last = int(np.flatnonzero(ok)[-1])
    rate = report["spectral_radius"]
    span = steps[max(last - 8, 0):last + 1]
    ax.semilogy(span, history[last] * rate ** (span - steps[last]), "--",
                label=f"slope rho(eta df/dg) = {rate:.3g}")
    ax.set_ylim(history[ok].min() / 3, history[ok].max() * 3)
  if 0 < t <= len(history):
    ax.axvline(t, color="grey", lw=0.8, label=f"model's T = {t} (operating point)")
  ax.plot([], [], " ", label=f"||eta df/dg||_2 = {report['spectral_norm']:.3g}")
  verdict = "holds" if report["theorem1_holds"] else "fails"
  ax.set_title(f"IM-block {index + 1} (dilation {report['dilation']}): "
               f"rho(eta df/dg) = {report['spectral_radius']:.3g}, Theorem 1 {verdict}")
  ax.set_xlabel("iteration j")
  ax.set_ylabel("relative residual")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes ``stability.json`` and one residual plot per block; returns the paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  json_path = out / "stability.json"
  json_path.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
  paths = [json_path]
  for i, block in enumerate(report["blocks"]):
    paths.append(out / f"block{i + 1}_residuals.png")
    plot_block(block, i, paths[-1])
  return paths


def summary_lines(report: dict[str, Any]) -> list[str]:
  lines = ["block  dilation  rho power  rho Arnoldi  ||eta J||_2  observed@T  observed tail  "
           "Theorem 1"]
  for i, b in enumerate(report["blocks"]):
    lines.append(f"{i + 1:>5}  {b['dilation']:>8}  {b['spectral_radius_growth']:>9.4f}  "
                 f"{b['spectral_radius_arnoldi']:>11.4f}  "
                 f"{b['spectral_norm']:>11.4f}  {b['observed_ratio_at_T']:>10.4f}  "
                 f"{b['observed_ratio_tail']:>13.4f}  "
                 f"{'holds' if b['theorem1_holds'] else 'FAILS'}")
  return lines


def _load_params(args: argparse.Namespace):
  from minet_jax import checkpoint
  if args.ckpt:
    return checkpoint.load(args.ckpt)
  from minet_jax import convert
  return convert.weights_from_checkpoint(args.pth)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m minet_jax.stability",
      description="Checks Theorem 1 (|lambda(df/dg)| < 1/eta) for every IM-block on one image.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--ckpt", help="minet-jax checkpoint folder (minet_jax.save / convert)")
  source.add_argument("--pth", help="the authors' PyTorch checkpoint, converted on the fly")
  parser.add_argument("--image", required=True, help="RGB image (PNG/JPEG)")
  parser.add_argument("--out", required=True, help="folder for stability.json and the plots")
  parser.add_argument("--steps", type=int, default=32,
                      help="Picard steps from each block's input for the residual curve")
  parser.add_argument("--radius-iters", type=int, default=60)
  parser.add_argument("--radius-window", type=int, default=20)
  parser.add_argument("--arnoldi-iters", type=int, default=30)
  parser.add_argument("--norm-iters", type=int, default=30)
  parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                      help="analyse the centre HxW crop only (faster)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be >= 2 (ratios need two residuals)")

  from minet_jax import api
  from minet_jax.image_io import ImageReadError, read_rgb
  from minet_jax.torch_pickle import UnsafePickleError
  try:
    params = _load_params(args)
  except (OSError, ValueError, UnsafePickleError) as e:
    print(f"error: could not load the model: {e}", file=sys.stderr)
    return 2
  try:
    image = read_rgb(args.image, dtype=np.uint8)
  except (OSError, ImageReadError) as e:
    print(f"error: could not read {args.image}: {e}", file=sys.stderr)
    return 2
  if args.crop:
    h, w = args.crop
    if not (0 < h <= image.shape[0] and 0 < w <= image.shape[1]):
      parser.error(f"--crop {h} {w} does not fit the {image.shape[0]}x{image.shape[1]} image")
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    image = image[top:top + h, left:left + w]
  api.validate_image(image)
  report = analyse_image(params, image, seed=args.seed, steps=args.steps,
                         radius_iters=args.radius_iters, radius_window=args.radius_window,
                         arnoldi_iters=args.arnoldi_iters, norm_iters=args.norm_iters)
  report["image"] = str(args.image)
  paths = write_report(report, args.out)
  print("\n".join(summary_lines(report)))
  print("wrote " + ", ".join(str(p) for p in paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
