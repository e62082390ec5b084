"""Theorem 1 on real weights: is each IM-block's Picard map locally contractive?

Block i iterates g <- T(g) = g0 + eta * f_i(g) (for a stage block, below, the stage
map g0 + s * eta * f_i(g)). Near a point g the error of that
iteration evolves by the Jacobian J = eta * df_i/dg, so the iteration settles when
the spectral radius rho(J) < 1, which is the paper's Theorem 1 condition: every
eigenvalue lambda of df/dg has |lambda| < 1/eta. The spectral norm ||J||_2 >= rho(J)
bounds one step's contraction; ||J||_2 < 1 makes T a contraction in the plain L2
norm, while rho(J) < 1 only promises contraction eventually (for a non-normal J the
error can first grow).

Estimators (matrix-free; J is 4.6M x 4.6M for a 460x620 image; `minet_jax.stability.spectral`):

* spectral radius: power iteration, reported as the growth rate over its last steps
  (which converges also when the dominant eigenvalue is a complex pair), with the
  plain ratio and the Rayleigh quotient beside it.
* spectral radius, second opinion: Arnoldi; the largest |Ritz value| converges far
  faster than power iteration when eigenvalues crowd near the top, as they do
  here. Both see only part of the spectrum and in practice approach rho from
  below, so the verdict uses the larger of the two.
* spectral norm: power iteration on J^T J, a lower bound that converges to ||J||_2.
* observed contraction: ratios r_{j+1}/r_j of successive Picard residuals. For a
  linear map they tend to rho(J); for MI-Net they are measured on the same block
  input g0 the model produced (a second stage: its base c), by running Picard from
  there for ``steps`` steps. (The model starts a second stage from g0 + eta f(k1)
  instead, so there ``residual_at_T`` and ``observed_ratio_at_T`` are read at the
  model's step count on this run from c, not on the model's own trajectory.)

Since the spectral estimates are reached from below, ``theorem1_holds`` (rho < 1) and
``contraction_in_l2`` (||J||_2 < 1) say that the iterations run found no direction
violating the bound, not a proof of it; more ``radius_iters`` / ``norm_iters`` tighten
them.

With ``stage_fraction`` s < 1 (`ModelConfig`) a block solves the stage
k = g0 + s * eta * f(k) of a one-stage implicit Runge-Kutta step instead, and everything
here is about that map: J = s * eta * df/dg, and Theorem 1 asks |lambda| < 1/(s * eta).
A two-stage block (``stages`` 2) solves two such maps, with different bases, in turn:
it is analysed at each stage's solution and reported at the stage with the larger
radius (``stages`` lists both), Theorem 1 holding when it holds at both.

The operating point is each block's solution in the model as configured (for the
released model: its output after T = 8 steps). Where a block has not converged there is no
fixed point to linearise about; the estimate then describes the map where the
model actually uses it.

This package: the analysis here, which needs no plotting library; the written
report (``stability.json`` and residual plots) in `minet_jax.stability.report`; the
command line in `minet_jax.stability.cli`:

    python -m minet_jax.stability --ckpt checkpoints/minet_its \\
        --image ../shared/data/RESIDE/SOTS/indoor/hazy/1400_1.png --out stability/1400_1
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minet_jax.core import fixed_point as fp
from minet_jax.stability import spectral


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


# Seeds that give distinct keys: jax.random.key takes a signed 64-bit integer but keeps
# only its low 32 bits without x64, so larger seeds would repeat smaller ones' reports.
MAX_SEED = 2**32 - 1


def check_settings(*, seed: int = 0, steps: int = 32, radius_iters: int = 60,
                   radius_window: int = 20, arnoldi_iters: int = 30,
                   norm_iters: int = 30) -> None:
  """Raises ValueError naming the first setting of `analyse_image` that cannot work, so a
  run fails before the model does any work, not after."""
  if not 0 <= seed <= MAX_SEED:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if steps < 2:
    raise ValueError(f"steps must be >= 2 (ratios need two residuals), got {steps}")
  for name, value in (("radius_iters", radius_iters), ("arnoldi_iters", arnoldi_iters),
                      ("norm_iters", norm_iters)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if not 1 <= radius_window <= radius_iters:
    raise ValueError(f"radius_window must be in [1, radius_iters = {radius_iters}], got "
                     f"{radius_window}")


# One compilation per block structure, settings and shape, shared by every image and
# stage analysed (a function defined per call would compile on every call).
@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "radius_iters",
                                             "radius_window", "arnoldi_iters", "norm_iters"))
def _figures(graphdef, state, g0, g, key, *, steps: int, radius_iters: int,
             radius_window: int, arnoldi_iters: int, norm_iters: int):
  """`analyse_block`'s estimates at (g0, g): power iteration, Arnoldi, the norm and the
  Picard residuals from g0."""
  t_map, f_state = nnx.merge(graphdef, state).map_fn()
  matvec, rmatvec = spectral.linearise(lambda z: t_map(z, (g0, f_state)), g)
  k1, k2, k3 = jax.random.split(key, 3)
  radius = spectral.spectral_radius(matvec, jax.random.normal(k1, g.shape),
                                    num_iters=radius_iters, window=radius_window)
  hess = spectral.arnoldi(matvec, jax.random.normal(k2, g.shape), num_iters=arnoldi_iters)
  norm = spectral.spectral_norm(matvec, rmatvec, jax.random.normal(k3, g.shape),
                                num_iters=norm_iters)
  picard = fp.fixed_point(t_map, fp.Unrolled(unroll=1), g0, (g0, f_state), max_steps=steps,
                          per_sample=True)
  return radius, hess, norm, picard.residual_history[0]


def analyse_block(block: Any, g0: jax.Array, g: jax.Array, *, key: jax.Array,
                  steps: int = 32, radius_iters: int = 60, radius_window: int = 20,
                  arnoldi_iters: int = 30, norm_iters: int = 30,
                  operating_steps: int | None = None) -> dict[str, Any]:
  """Theorem-1 figures of one `IMBlock` at the operating point ``g`` with input ``g0``.

  Args:
    block: an `minet_jax.core.model.IMBlock`.
    g0, g: the stage map's base and its solution in the model (`BlockRun.points`:
      the block's input and its output for implicit Euler, its stage for a one-stage
      block; one image, NHWC, batch 1).
    key: PRNG key of the power iterations' start vectors.
    steps: Picard steps from g0 (the stage map's base) whose residuals give the
      observed contraction.
    radius_iters, radius_window, arnoldi_iters, norm_iters: estimator settings.
    operating_steps: the map evaluations the model's solve took to reach ``g`` (its
      operating point T for the observed rates; default the block's ``iterations``,
      which unrolled steps always take).
  """
  if g.shape[0] != 1:
    raise ValueError(f"analyse one image at a time (batch 1), got batch {g.shape[0]}")
  if g.dtype != jnp.float32 or g0.dtype != jnp.float32:
    # The iterations resolve changes far below bfloat16's rounding (and their float32
    # start vectors would not be tangents of a bfloat16 map).
    raise ValueError(f"the analysis runs in float32, got {g0.dtype} / {g.dtype} features: "
                     "run the model with dtype='float32' (Params.replace_config)")
  graphdef, state = nnx.split(block)
  radius, hess, norm, history = jax.device_get(_figures(
      graphdef, state, g0, g, key, steps=steps, radius_iters=radius_iters,
      radius_window=radius_window, arnoldi_iters=arnoldi_iters, norm_iters=norm_iters))
  ritz = spectral.ritz_summary(hess)
  ratios = observed_ratios(history)
  t = int(block.iterations if operating_steps is None else operating_steps)
  eta = float(block.eta)
  step = float(block.step)  # The solved map's step (`IMBlock.step`).
  # Both estimators see only part of the spectrum and approach rho from below in
  # practice, so the verdict uses the larger of the two.
  rho = max(float(radius["radius"]), ritz["radius"])
  sigma = float(norm["norm"])
  return {
      "eta": eta,
      "stage_fraction": float(block.stage_fraction),
      "iterations": int(block.iterations),
      "operating_steps": t,
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
      "max_abs_eigenvalue_df": rho / step,
      "theorem1_bound": 1.0 / step,
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


# What `analyse_image` reports of each stage of a two-stage block.
STAGE_FIGURES = ("spectral_radius", "spectral_norm", "theorem1_holds", "observed_ratio_tail")


def analyse_image(params: Any, image: np.ndarray, *, seed: int = 0,
                  **block_kwargs: Any) -> dict[str, Any]:
  """Runs the model on one image and `analyse_block` on every IM-block.

  Args:
    params: `minet_jax.Params`; its config decides the operating point (solver, T).
    image: HxWx3 RGB, uint8 or float in [0, 1].
    seed: seed of the power iterations.
    **block_kwargs: forwarded to `analyse_block`.
  """
  from minet_jax.core import api
  from minet_jax.core.params import model_from_params

  check_settings(seed=seed, **block_kwargs)
  if params.config.dtype != "float32":
    raise ValueError(f"the stability analysis needs float32 compute (its iterations resolve "
                     f"changes far below {params.config.dtype} rounding); this model computes "
                     f"in {params.config.dtype}: analyse its weights with "
                     "params.replace_config(dtype='float32')")
  model = model_from_params(params)
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
    # Every stage's map at its solution.
    stage_keys = spectral.stage_keys(key, len(run.points))
    stages = [analyse_block(block, base, g, key=k, operating_steps=int(n[0]), **block_kwargs)
              for (base, g), k, n in zip(run.points, stage_keys, run.stage_steps)]
    # The block is reported at its least contractive stage (its Picard residuals and
    # rates); Theorem 1 must hold at each stage, and the norm is the larger one.
    report = dict(max(stages, key=lambda r: r["spectral_radius"]))
    if len(stages) > 1:
      report["theorem1_holds"] = all(r["theorem1_holds"] for r in stages)
      report["spectral_norm"] = max(r["spectral_norm"] for r in stages)
      report["contraction_in_l2"] = report["spectral_norm"] < 1.0
      report["stages"] = [{k: r[k] for k in STAGE_FIGURES} for r in stages]
    report["model_steps"] = int(run.result.num_steps[0])
    report["model_residual"] = float(run.result.residual[0])
    report["model_status"] = fp.RESULTS(int(run.result.status[0])).name
    blocks.append(report)
  return {"config": params.config.to_dict(), "image_size": [int(h), int(w)], "blocks": blocks}


def summary_lines(report: dict[str, Any]) -> list[str]:
  """The per-block table of an `analyse_image` report, one line per row."""
  lines = ["block  dilation  rho power  rho Arnoldi      ||J||_2  observed@T  observed tail  "
           "Theorem 1  steps  residual  solve"]
  for i, b in enumerate(report["blocks"]):
    lines.append(f"{i + 1:>5}  {b['dilation']:>8}  {b['spectral_radius_growth']:>9.4f}  "
                 f"{b['spectral_radius_arnoldi']:>11.4f}  "
                 f"{b['spectral_norm']:>11.4f}  {b['observed_ratio_at_T']:>10.4f}  "
                 f"{b['observed_ratio_tail']:>13.4f}  "
                 f"{'holds' if b['theorem1_holds'] else 'FAILS':>9}  {b['model_steps']:>5}  "
                 f"{b['model_residual']:>8.1e}  {b.get('model_status', '-')}")
  short = [str(i + 1) for i, b in enumerate(report["blocks"])
           if len(b["residual_history"]) < b.get("operating_steps", b["iterations"])]
  if short:
    lines.append(f"observed@T is partial or nan for block(s) {', '.join(short)}: the residual "
                 f"curve ({len(report['blocks'][0]['residual_history'])} Picard steps) stops "
                 "before the steps T the model's solve took; take more (--steps)")
  return lines
