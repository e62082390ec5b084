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
* `power_pair` and `projected_radius`: the dominant invariant planes of J and J^T from
  power iteration, and the radius of J projected onto them, whose derivative is the
  dominant eigenvalue's own (what `minet_jax.stability.contractive` differentiates for
  the "radius_exact" penalty).
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


def dot(x: jax.Array, y: jax.Array, *, per_sample: bool = False) -> jax.Array:
  """<x, y> in float32: a scalar, or one per entry of the leading axis."""
  axes = tuple(range(1, x.ndim)) if per_sample else None
  return jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32), axis=axes)


def norm(x: jax.Array, *, per_sample: bool = False) -> jax.Array:
  """L2 norm in float32: a scalar, or one per entry of the leading axis. Its gradient at
  a zero vector is zero, not NaN (a zero ``J v``: a nilpotent or zero Jacobian)."""
  axes = tuple(range(1, x.ndim)) if per_sample else None
  squares = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
  # sqrt's derivative at 0 is infinite, and times the zero derivative of the sum it is
  # NaN: take the root of 1 there and select 0. (optax.safe_norm does the same, but for
  # one or two axes only, and copies x.)
  nonzero = squares != 0  # NaN stays NaN.
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)


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


def _component(x: jax.Array, y: jax.Array, per_sample: bool) -> jax.Array:
  """<x, y> x: y's component along the unit vector x (per sample when asked)."""
  d = dot(x, y, per_sample=per_sample)
  return (d.reshape((-1,) + (1,) * (x.ndim - 1)) if per_sample else d) * x


def power_pair(matvec: Operator, v0: jax.Array, *, num_iters: int,
               per_sample: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The last two of ``num_iters`` power-iteration steps v <- J v / ||J v|| from ``v0``,
  as a plane: the estimate of J's dominant invariant plane that `projected_radius` takes.

  Returns (q1, q2, a, c): q1 = v_(k-1), q2 the unit remainder of v_k beside it (two
  Gram-Schmidt passes), and v_k = a q1 + c q2. A complex dominant pair makes the
  iterates rotate in its (real) invariant plane; a real dominant eigenvalue is in that
  plane too, with the next mode's remainder beside it. Where v_k is v_(k-1) to float32
  rounding (c below 1e-5: one eigenvector) q2 is noise, which `pair_planes` replaces.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  start = unit(v0, per_sample=per_sample)
  previous, last = jax.lax.fori_loop(
      0, num_iters, lambda _, pair: (pair[1], unit(matvec(pair[1]), per_sample=per_sample)),
      (start, start))

  a = dot(previous, last, per_sample=per_sample)
  rest = last - _component(previous, last, per_sample)
  rest = rest - _component(previous, rest, per_sample)  # The second pass keeps q2 orthogonal.
  return previous, unit(rest, per_sample=per_sample), a, norm(rest, per_sample=per_sample)


def _safe_sqrt(x: jax.Array, floor: float) -> jax.Array:
  """sqrt(max(x, floor)) with a finite gradient (sqrt's is infinite at 0)."""
  return jnp.sqrt(jnp.maximum(x, floor))


# |det| of the 2 x 2 overlap <p_i, q_j> of two orthonormal bases below which the
# oblique projection is refused: the product of the cosines of the planes' principal
# angles, 1 for equal planes; float32 sums over millions of elements leave the
# overlaps about 1e-6 off.
_OVERLAP_FLOOR = 1e-4
# A remainder c of `power_pair` below this: the plane is one vector (converged), its q2
# float32 rounding noise. Larger remainders carry the next mode, however slowly it
# decays (the projection onto the plane then stays exact).
_ONE_VECTOR = 1e-5


def pair_planes(right: tuple[jax.Array, ...], left: tuple[jax.Array, ...], *,
                per_sample: bool = False) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """`power_pair`'s planes of J and J^T made ready for `projected_radius`: a plane that
  has collapsed to one vector (c below 1e-5) while the other has not takes as its
  second vector the other plane's, orthogonalised against its own first (its q2 was
  rounding noise). Where the right plane holds x and the left one holds y, that keeps
  both in, and the overlap of the planes away from 0; the products with J and J^T
  are taken after this."""
  def borrow(own, other):
    q1, q2, a, c = own
    fill = other[1] - _component(q1, other[1], per_sample)
    fill = unit(fill - _component(q1, fill, per_sample), per_sample=per_sample)
    collapsed = (c < _ONE_VECTOR) & (other[3] >= _ONE_VECTOR)
    if per_sample:
      collapsed = collapsed.reshape((-1,) + (1,) * (q1.ndim - 1))
    return q1, jnp.where(collapsed, fill, q2), a, c

  return borrow(right, left), borrow(left, right)


def _eigenpair_fits(coefficients: jax.Array, lam: jax.Array, gram: jax.Array,
                    tolerance: float) -> jax.Array:
  """Whether ||K x - lam x|| <= tolerance |lam| ||x|| for x = sum_i coefficients_i basis_i
  (complex; False for x = 0), from the Gram matrix of (K basis_1, K basis_2, basis_1,
  basis_2): no products with K."""
  c = jnp.concatenate([coefficients, -lam * coefficients])
  misfit = jnp.real(jnp.einsum("i...,ij...,j...->...", jnp.conj(c), gram, c))
  size = jnp.real(jnp.einsum("i...,ij...,j...->...", jnp.conj(coefficients), gram[2:, 2:],
                             coefficients))
  return (size > 0) & (misfit <= jnp.square(tolerance * jnp.abs(lam)) * size)


def _null_vector(m: jax.Array, lam: jax.Array) -> jax.Array:
  """a with (m - lam I) a = 0 for a 2 x 2 ``m`` (leading axes (2, 2)) and its eigenvalue lam."""
  first = jnp.asarray([m[0, 1], lam - m[0, 0]])
  second = jnp.asarray([lam - m[1, 1], m[1, 0]])
  return jnp.where(jnp.sum(jnp.abs(first) ** 2, 0) >= jnp.sum(jnp.abs(second) ** 2, 0),
                   first, second)


def projected_radius(right: tuple[jax.Array, ...], left: tuple[jax.Array, ...],
                     j_right: tuple[jax.Array, jax.Array],
                     jt_left: tuple[jax.Array, jax.Array], *, per_sample: bool = False,
                     tolerance: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """The dominant eigenvalue modulus of J, from J projected onto a right and a left plane.

  ``right`` and ``left`` are `power_pair`'s planes of J and J^T, (q1, q2, a, c) and
  (p1, p2, ...), through `pair_planes`; ``j_right`` = (J q1, J q2), the only arguments
  differentiated, and ``jt_left`` = (J^T p1, J^T p2), used only to check the answer.

  Take the oblique (two-sided Rayleigh-Ritz) projection M = (P^T Q)^(-1) P^T J Q. If
  the right plane holds an eigenvector x of J (J x = lambda x) and the left one the
  matching left eigenvector y (y^T J = lambda y^T), lambda is an eigenvalue of M (the
  row of P^T J Q that y gives is lambda times that row of P^T Q), and the pencil's
  eigenvectors are those of x and y, so its derivative through M is J's own,
  dlambda = y^T dJ x / y^T x (first-order perturbation of a simple eigenvalue). That
  holds for a complex pair (both eigenvalues of M; x, y complex in the planes) and for
  a real dominant eigenvalue (one of them; the other belongs to whatever else the
  planes hold and can be anything). With one of x, y alone in its plane lambda is still
  an eigenvalue of M, but its derivative is not J's. So with the planes held constant,
  differentiating the modulus (through ``j_right`` only) gives d rho exactly once the
  planes hold both eigenvectors; a one-sided estimate such as ||J v|| gives it only for
  a normal J. Where both planes are one vector (`power_pair`'s c below 1e-5) the
  projection is onto q1 and p1 alone: lambda = p1^T J q1 / p1^T q1.

  Of M's eigenvalues (closed form), those whose right and left eigenvectors in the
  planes, x = Q a and y = P b, are J's to within ``tolerance`` (||J x - lambda x|| and
  ||J^T y - lambda y|| at most ``tolerance`` |lambda| times ||x||, ||y||) are kept,
  and the larger modulus is the answer: a plane that has not converged can give M an
  eigenvalue J does not have, or J's with another derivative. The check bounds the
  eigenvectors' residuals, not the error of lambda, which a non-normal J can make larger.

  Returns (radius, found): ``found`` is False where no eigenvalue passes, or the planes
  are too close to orthogonal for the projection (|det P^T Q| below 1e-4); the radius
  there is 0, for the caller to replace.
  """
  def entry(p, q):
    return dot(p, q, per_sample=per_sample)

  def gram_of(vectors):
    return jnp.asarray([[entry(x, y) for y in vectors] for x in vectors])

  q1, q2, _, c_right = right
  p1, p2, _, c_left = left
  one_vector = (c_right < _ONE_VECTOR) & (c_left < _ONE_VECTOR)
  g = jax.lax.stop_gradient(jnp.asarray([[entry(p, q) for q in (q1, q2)] for p in (p1, p2)]))
  h = jnp.asarray([[entry(p, jq) for jq in j_right] for p in (p1, p2)])   # (2, 2[, batch])
  # One vector per side: the 2 x 2 problem with the second basis vectors decoupled
  # (G and H diagonal in them, M's second eigenvalue 0, never the larger).
  keep = jnp.asarray([[1.0, 0.0], [0.0, 0.0]]).reshape((2, 2) + (1,) * (g.ndim - 2))
  g = jnp.where(one_vector, g * keep + (1 - keep) * jnp.eye(2).reshape(keep.shape), g)
  h = jnp.where(one_vector, h * keep, h)
  det_g = g[0, 0] * g[1, 1] - g[0, 1] * g[1, 0]
  well_posed = jnp.abs(det_g) >= _OVERLAP_FLOOR
  det_g = jnp.where(well_posed, det_g, 1.0)
  inverse = jnp.asarray([[g[1, 1], -g[0, 1]], [-g[1, 0], g[0, 0]]]) / det_g
  m = jnp.einsum("ij...,jk...->ik...", inverse, h)
  half_trace = 0.5 * (m[0, 0] + m[1, 1])
  det_m = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
  # (lambda - half_trace)^2 = disc: below 0 a complex pair of modulus sqrt(det). The
  # floor bounds the gradient near a double eigenvalue (disc = 0, where the
  # eigenvalues are not differentiable) at the cost of 1e-3 in the value there.
  disc = jnp.square(0.5 * (m[0, 0] - m[1, 1])) + m[0, 1] * m[1, 0]
  root = _safe_sqrt(disc, 1e-6)
  complex_pair = _safe_sqrt(det_m, 1e-12)
  moduli = [jnp.where(disc >= 0, jnp.abs(half_trace + sign * root), complex_pair)
            for sign in (1, -1)]

  # Which eigenvalues are J's, with both eigenvectors: each eigenpair's residuals.
  frozen_m = jax.lax.stop_gradient(m).astype(jnp.complex64)
  frozen_disc = jax.lax.stop_gradient(disc).astype(jnp.complex64)
  g_inverse = jax.lax.stop_gradient(inverse).astype(jnp.complex64)
  # The Gram matrices of each side's (K q1, K q2, q1, q2), shared by both eigenvalues.
  gram_right, gram_left = (gram_of(jax.lax.stop_gradient((*images, *basis))).astype(jnp.complex64)
                           for images, basis in ((j_right, (q1, q2)), (jt_left, (p1, p2))))
  found = jnp.zeros_like(well_posed)
  radius = jnp.zeros_like(moduli[0])
  for sign, modulus in zip((1, -1), moduli):
    lam = 0.5 * (frozen_m[0, 0] + frozen_m[1, 1]) + sign * jnp.sqrt(frozen_disc)
    a = _null_vector(frozen_m, lam)
    # y = P b with b = G^(-T) w, w the left eigenvector of M (M^T w = lam w).
    w = _null_vector(jnp.swapaxes(frozen_m, 0, 1), lam)
    b = jnp.einsum("ji...,j...->i...", g_inverse, w)
    ok = (_eigenpair_fits(a, lam, gram_right, tolerance)
          & _eigenpair_fits(b, lam, gram_left, tolerance))
    radius = jnp.where(ok & (modulus > radius), modulus, radius)
    found = found | ok
  found = found & well_posed
  return jnp.where(found, radius, 0.0), found


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
