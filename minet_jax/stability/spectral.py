"""Matrix-free spectral estimates of a linear operator J given as v -> J v (and J^T w).

Nothing here knows about MI-Net: `minet_jax.stability` applies these to the
Jacobian of an IM-block's Picard map, and `minet_jax.stability.contractive` differentiates a
spectral-norm estimate inside the training loss. Every function is jit-friendly
(fixed iteration counts, ``lax`` loops).

* `linearise`: J v and J^T w of a function's Jacobian at a point, linearised once.
* `spectral_radius`: power iteration v <- Jv / ||Jv||. The plain estimate ||J v_k||
  converges to |lambda_max| when the dominant eigenvalue is real and unique; when it
  is a complex pair (or nearly tied) the per-step ratio oscillates. The growth rate
  (||J^k v|| / ||J^(k-w) v||)^(1/w) over the last w steps (Gelfand's formula
  rho = lim ||J^k||^(1/k) applied to one generic vector, start-up transient dropped)
  converges in both cases; it is reported beside the plain ratio and the Rayleigh
  quotient <v, Jv> (close to +-rho for a real dominant eigenvalue).
* `arnoldi` and `ritz_summary`: a Krylov basis of J from one vector; the largest
  |Ritz value| reaches the outermost eigenvalue far faster than power iteration
  when eigenvalues crowd near the top. Both radius estimators see only part of the
  spectrum and in practice approach rho from below.
* `krylov_residuals`: from the same Hessenberg matrix, started at the residual r0 of
  a fixed-point problem z = J z + b, the smallest residual any Krylov method can reach
  in k steps (GMRES's): a lower bound for Anderson acceleration with any history
  (without truncation, damping or regularisation, Anderson's iterate is T of GMRES's,
  Walker and Ni 2011). Picard's residual is p(J) r0 for p(z) = z^k; the best method
  picks the best p of degree k with p(1) = 1. When the eigenvalues of J ring the
  origin, z^k is nearly that p: with equal weights on a ring of radius r the best
  residual tends to sqrt(1 - r^2) times Picard's as k grows, the same rate.
* `spectral_norm` (`top_singular_vector`): power iteration on J^T J; ||J v|| for the
  final unit v is a lower bound that converges to ||J||_2.

``per_sample=True`` (power iterations only) treats the leading axis as a batch of
independent problems: J must be block diagonal over that axis (as the Jacobian of
a map that acts on each sample separately is), and each sample gets its own
vector, normalisation and estimate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Operator = Callable[[jax.Array], jax.Array]


def norm(x: jax.Array, *, per_sample: bool = False) -> jax.Array:
  """L2 norm in float32: a scalar, or one per entry of the leading axis."""
  axes = tuple(range(1, x.ndim)) if per_sample else None
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))


def unit(x: jax.Array, *, per_sample: bool = False) -> jax.Array:
  """``x / norm(x)`` (per sample when asked); a zero vector stays zero."""
  n = norm(x, per_sample=per_sample)
  if per_sample:
    n = n.reshape((-1,) + (1,) * (x.ndim - 1))
  return x / jnp.maximum(n, jnp.finfo(jnp.float32).tiny)


def stage_keys(key: jax.Array, count: int) -> list[jax.Array]:
  """One PRNG key per stage of a block (`ModelConfig.stages`) from the block's ``key``:
  the first is ``key`` itself, so a one-stage block draws as it would alone."""
  return [key, *jax.random.split(jax.random.fold_in(key, 1), count - 1)]


def linearise(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> tuple[Operator, Operator]:
  """(v -> J v, w -> J^T w) for J = dfn/dx at ``x``; fn is linearised once and reused."""
  _, matvec = jax.linearize(fn, x)
  transpose = jax.linear_transpose(matvec, x)
  return matvec, lambda w: transpose(w)[0]


def spectral_radius(matvec: Operator, v0: jax.Array, *, num_iters: int = 60,
                    window: int = 20) -> dict[str, jax.Array]:
  """Power-iteration estimates of rho(J) (module docstring).

  Returns a dict with ``radius`` (growth rate over the last ``window`` steps),
  ``radius_power`` (the last ||J v||), ``rayleigh`` (<v, Jv> for the last unit v),
  ``ratios`` (||J v_k|| for every step k) and ``vector`` (the final unit vector
  J v / ||J v||, the dominant eigenvector's direction for a real dominant eigenvalue).
  """
  if num_iters < 1 or not 1 <= window <= num_iters:
    raise ValueError(f"need num_iters >= 1 and 1 <= window <= num_iters, got {num_iters}, "
                     f"{window}")

  def step(v, _):
    w = matvec(v)
    return unit(w), (norm(w), jnp.vdot(v.astype(jnp.float32), w.astype(jnp.float32)))

  vector, (ratios, rayleighs) = jax.lax.scan(step, unit(v0), None, length=num_iters)
  tail = jnp.log(jnp.maximum(ratios[-window:], jnp.finfo(jnp.float32).tiny))
  return {"radius": jnp.exp(jnp.mean(tail)), "radius_power": ratios[-1],
          "rayleigh": rayleighs[-1], "ratios": ratios, "vector": vector}


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
  basis = jnp.zeros((k + 1,) + v0.shape, jnp.float32).at[0].set(unit(v0).astype(jnp.float32))
  hess = jnp.zeros((k + 1, k), jnp.float32)
  axes = tuple(range(v0.ndim))
  dot = functools.partial(jnp.tensordot, axes=(tuple(a + 1 for a in axes), axes),
                          precision=jax.lax.Precision.HIGHEST)
  comb = functools.partial(jnp.tensordot, axes=(0, 0), precision=jax.lax.Precision.HIGHEST)

  def step(j, carry):
    basis, hess = carry
    w = matvec(basis[j]).astype(jnp.float32)
    scale = norm(w)
    h = dot(basis, w)  # Rows beyond j are still zero, so they project out nothing.
    w = w - comb(h, basis)
    h2 = dot(basis, w)
    w = w - comb(h2, basis)
    beta = norm(w)
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


def krylov_residuals(hess: np.ndarray) -> np.ndarray:
  """Minimal residuals of a Krylov method on the fixed-point problem z = J z + b.

  ``hess`` is `arnoldi`'s (k+1) x k matrix for J started at the residual r0 = J z0 + b - z0.
  Returns, for j = 1..k, min ||r_j|| / ||r0|| over z_j in z0 + K_j(J, r0): the GMRES
  residual of (I - J) z = b, min_y ||e1 - (I - H_j) y|| with H_j the leading
  (j+1) x j block of ``hess``. A breakdown (a zero subdiagonal) leaves later values
  at the exact solution's residual, 0 up to rounding.
  """
  hess = np.asarray(hess, np.float64)
  k = hess.shape[1]
  out = np.empty(k)
  for j in range(1, k + 1):
    a = np.eye(j + 1, j) - hess[:j + 1, :j]
    rhs = np.zeros(j + 1)
    rhs[0] = 1.0
    y = np.linalg.lstsq(a, rhs, rcond=None)[0]
    out[j - 1] = np.linalg.norm(rhs - a @ y)
  return out


def top_singular_vector(matvec: Operator, rmatvec: Operator, v0: jax.Array, *,
                        num_iters: int, per_sample: bool = False
                        ) -> tuple[jax.Array, jax.Array]:
  """``num_iters`` steps of power iteration on J^T J from ``v0``.

  Returns the final unit vector v (an estimate of the top right singular vector)
  and ||J v_k|| of the vector each step started from, shape (num_iters,) or
  (num_iters, batch) with ``per_sample``.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")

  def step(v, _):
    jv = matvec(v)
    return unit(rmatvec(jv), per_sample=per_sample), norm(jv, per_sample=per_sample)

  return jax.lax.scan(step, unit(v0, per_sample=per_sample), None, length=num_iters)


def spectral_norm(matvec: Operator, rmatvec: Operator, v0: jax.Array, *,
                  num_iters: int = 30, per_sample: bool = False) -> dict[str, jax.Array]:
  """Power iteration on J^T J: ``norm`` = ||J v|| for the last unit v, ``history`` per step."""
  v, history = top_singular_vector(matvec, rmatvec, v0, num_iters=num_iters,
                                   per_sample=per_sample)
  final = norm(matvec(v), per_sample=per_sample)
  return {"norm": final, "history": jnp.concatenate([history, final[None]])}
