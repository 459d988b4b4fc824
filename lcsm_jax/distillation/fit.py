"""The closed-form fit of every filter: poles by ERA (Ho-Kalman), residues by least squares.

Per filter, on its window (`hankel.window`: the taps h[1:], or box sums of taps; the Hankel
samples at stride s_H for the poles, the finer fit samples at stride s for the residues):

1. ERA: H = U Sigma W^T (the symmetric Hankel's eigendecomposition), keep the N largest
   singular triplets, A = Sigma^{-1/2} U^T H_shift W Sigma^{-1/2} with H_shift[i, j] =
   g[i + j + 1]; the poles of the window's samples are the eigenvalues q of A (an N x N real
   matrix, so they are real or conjugate pairs).
2. Pairing: one slot per conjugate pair (the member with Im q > 0) and one slot per real
   eigenvalue (its residue comes out real: Re(R p^t) = Re(R) p^t when p is real, so a real pole
   costs two real states like a pair). With r real eigenvalues that is N/2 + r/2 candidates for
   N/2 slots: the weakest r/2 are dropped, ranked by the l2 norm of their ERA mode,
   |c_n b_n| / sqrt(1 - |q_n|^2) (twice that for a pair).
3. Stride: the full-rate pole is the principal root p = |q|^(1/s_H) exp(i arg(q) / s_H) (q
   itself at stride 1); a negative real q at stride s_H > 1 becomes a pair at angle pi / s_H.
4. |p| is clipped radially to at most `max_modulus` (< 1).
5. Residues: linear least squares over the window's fit samples, g[m] = Re sum_n R_n
   beta_n p_n^(m s) with beta_n = sum_{j < s} p_n^j, solved for (Re R, Im R) as one real problem
   (columns Re(beta p^(ms)) and -Im(beta p^(ms)), normalised, by a batched SVD pseudo-inverse
   with a relative cutoff `RCOND`; a real pole's imaginary column is zero and gets Im R = 0).

Precision: all of it in NumPy float64. The Hankel singular values span many decades (tol down to
1e-10 needs them) and Vandermonde matrices of poles near the unit circle are ill-conditioned, so
float32 is not enough; NumPy's LAPACK wrappers (eigh, eig, svd) batch over stacks of matrices,
need no compilation per shape, and leave JAX's global x64 switch alone. The arrays are small (F x
M samples, M ~ 2k), so there is little for an accelerator to win here (`blas.threads` keeps
OpenBLAS on one thread meanwhile).
"""

from __future__ import annotations

import numpy as np

from lcsm_jax.distillation import hankel


def era_poles(samples: np.ndarray, k: int, order: int, values: np.ndarray,
              vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ERA poles of the samples' system.

  Args:
    samples: (F, >= 2k) window samples.
    k: Hankel size.
    order: N <= k.
    values, vectors: `hankel.hankel_eigh(samples, k)`.

  Returns:
    q (F, N) complex128 eigenvalues of the reduced state matrix, and the l2 norm of each mode's
    sample sequence (F, N) float64 (inf for |q| >= 1).
  """
  lam = values[:, :order]
  sig = np.abs(lam)
  floor = np.maximum(sig[:, :1] * 1e-15, np.finfo(np.float64).tiny)
  sig = np.maximum(sig, floor)
  left = vectors[:, :, :order]
  right = left * np.where(lam < 0, -1.0, 1.0)[:, None, :]
  shifted = hankel.hankel_matrices(samples, k, shift=1)
  core = np.matmul(np.swapaxes(left, 1, 2), np.matmul(shifted, right))
  scale = 1.0 / np.sqrt(sig)
  a = scale[:, :, None] * core * scale[:, None, :]
  q, x = np.linalg.eig(a)
  b = np.sqrt(sig) * right[:, 0, :]
  c = np.sqrt(sig) * left[:, 0, :]
  c_modal = np.einsum("fi,fin->fn", c, x)
  with np.errstate(all="ignore"):
    b_modal = np.linalg.solve(x, b[..., None])[..., 0]
    residue = np.abs(c_modal * b_modal)
    gap = 1.0 - np.abs(q) ** 2
    norm = np.where(gap > 0, residue / np.sqrt(np.maximum(gap, 1e-300)), np.inf)
  norm = np.where(np.isfinite(q), norm, -np.inf)
  return q, np.nan_to_num(norm, nan=-np.inf)


def pair_slots(q: np.ndarray, norm: np.ndarray, slots: int) -> np.ndarray:
  """(F, N) eigenvalues -> (F, slots) one pole per slot (module docstring, step 2).

  Slots left without a candidate (only possible for non-finite eigenvalues) get pole 0.
  """
  upper = q.imag > 0
  candidate = (q.imag >= 0) & np.isfinite(q)
  with np.errstate(over="ignore"):
    weight = np.where(upper, 2.0 * norm, norm)
  weight = np.where(candidate, weight, -np.inf)
  order = np.argsort(-weight, axis=-1, kind="stable")[:, :slots]
  chosen = np.take_along_axis(q, order, -1)
  ok = np.take_along_axis(weight, order, -1) > -np.inf
  return np.where(ok, chosen, 0)


def full_rate(q: np.ndarray, stride: np.ndarray) -> np.ndarray:
  """Principal s-th roots of the window's poles: (F, n) with stride (F,) -> (F, n)."""
  s = stride[:, None].astype(np.float64)
  root = np.abs(q) ** (1.0 / s) * np.exp(1j * np.angle(q) / s)
  return np.where(s == 1, q, np.where(q == 0, 0, root))


def clip_poles(poles: np.ndarray, max_modulus: float) -> np.ndarray:
  """Radial projection onto |p| <= max_modulus."""
  mod = np.abs(poles)
  with np.errstate(all="ignore"):
    factor = np.where(mod > max_modulus, max_modulus / mod, 1.0)
  return poles * factor


def _expm1(z: np.ndarray) -> np.ndarray:
  """exp(z) - 1 for complex z without cancellation near 0."""
  x, y = z.real, z.imag
  return np.expm1(x) * np.cos(y) - 2.0 * np.sin(y / 2) ** 2 + 1j * np.exp(x) * np.sin(y)


def used_slots(orders: np.ndarray, slots: int) -> np.ndarray:
  """(F, slots) bool: slot j of filter f is used when j < orders[f] / 2."""
  return np.arange(slots)[None, :] < (np.asarray(orders) // 2)[:, None]


def design(poles: np.ndarray, stride: np.ndarray, count: int,
           used: np.ndarray | None = None) -> np.ndarray:
  """(F, count, n) complex: beta_n p_n^(m s) for samples m < count, 0 for unused slots.

  A used slot may hold pole 0 (ERA finds it for an FIR term: R p^(t-1) is R at t = 1 and 0
  after, so its samples are R at m = 0 whatever the stride). `used` defaults to every slot (an
  unused slot's residue is 0, so evaluating it adds nothing).
  """
  used = np.ones(poles.shape, bool) if used is None else used
  zero = poles == 0
  logp = np.log(np.where(zero, 1.0, poles))
  s = stride[:, None].astype(np.float64)
  with np.errstate(all="ignore"):
    beta = np.where(s == 1, 1.0, _expm1(s * logp) / _expm1(logp))
  beta = np.where(zero, 1.0, np.where(np.isfinite(beta), beta, 0.0))
  m = np.arange(count, dtype=np.float64)
  power = np.exp(m[None, :, None] * (s * logp)[:, None, :])
  power = np.where(zero[:, None, :], (m == 0)[None, :, None], power)
  return np.where(used[:, None, :], power * beta[:, None, :], 0)


# Singular values of the column-normalised least-squares matrix below RCOND times the largest
# are dropped (minimum-norm solution). The taps are float32 (relative noise ~1e-7), so directions
# the samples determine worse than that only amplify noise; and with box sums (stride s > 1) a
# pair at angle ~pi / s is nearly invisible in the samples (its samples alternate in sign and
# lose one of the residue's two real parameters) while its taps are not: a cutoff at 1e-13 let
# such a direction take residues of 5e13 on a large-1m filter (tap error 3e13 times the filter).
RCOND = 1e-6


def fit_residues(poles: np.ndarray, win: hankel.Window, used: np.ndarray,
                 rcond: float = RCOND) -> np.ndarray:
  """Least-squares residues (F, n) complex128 for poles (F, n) on the window's samples; 0 in
  slots that are not `used` (F, n)."""
  count = win.samples.shape[1]
  v = design(poles, win.stride, count, used)
  real = poles.imag == 0
  cols = np.concatenate([v.real, np.where(real[:, None, :], 0.0, -v.imag)], -1)
  weight = win.complete.astype(np.float64)
  cols = cols * weight[:, :, None]
  rhs = win.samples * weight
  norms = np.linalg.norm(cols, axis=1)
  norms = np.where(norms > 0, norms, 1.0)
  cols = cols / norms[:, None, :]
  u, sv, vt = np.linalg.svd(cols, full_matrices=False)
  keep = sv > rcond * sv[:, :1]
  inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
  coef = np.einsum("fji,fj,fmj,fm->fi", vt, inv, u, rhs)
  coef = coef / norms
  n = poles.shape[1]
  residues = coef[:, :n] + 1j * coef[:, n:]
  return np.where(used, residues, 0)


def window_error(poles: np.ndarray, residues: np.ndarray, win: hankel.Window) -> np.ndarray:
  """Relative l2 error (F,) of the model on the window's complete samples."""
  v = design(poles, win.stride, win.samples.shape[1])
  model = np.einsum("fmn,fn->fm", v, residues).real
  weight = win.complete
  err = np.linalg.norm(np.where(weight, model - win.samples, 0.0), axis=1)
  ref = np.linalg.norm(np.where(weight, win.samples, 0.0), axis=1)
  return np.divide(err, ref, out=np.zeros_like(err), where=ref > 0)


def fit_window(win: hankel.Window, values: np.ndarray, vectors: np.ndarray, orders: np.ndarray,
               slots: int, max_modulus: float) -> tuple[np.ndarray, np.ndarray]:
  """Poles and residues (F, slots) complex128 for filters with per-filter orders (F,) (even,
  <= 2 slots, <= k); slots beyond a filter's order / 2 (`used_slots`) hold pole 0 and residue
  0. A used slot can hold pole 0 too (an FIR term at tap 1), with any residue."""
  filters = win.samples.shape[0]
  poles = np.zeros((filters, slots), np.complex128)
  for order in np.unique(orders):
    sel = np.flatnonzero(orders == order)
    q, norm = era_poles(win.hankel[sel], win.size, int(order), values[sel], vectors[sel])
    chosen = pair_slots(q, norm, int(order) // 2)
    chosen = clip_poles(full_rate(chosen, win.hankel_stride[sel]), max_modulus)
    poles[sel, :int(order) // 2] = chosen
  residues = fit_residues(poles, win, used_slots(orders, slots))
  return poles, residues
