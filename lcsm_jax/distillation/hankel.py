"""Hankel singular values of long filters, on a window that scales to 10^6 taps, and the order
they suggest.

The Hankel matrix of the Markov parameters h[1:] is H[i, j] = h[i + j + 1]. For one filter:

1. Window: the effective length n_eff is the fewest taps h[1 .. n_eff] whose complement (the
   tail) holds at most `energy_tol` of the energy of h[1:]; the fit ignores that tail.
2. Samples: a box sum of s taps is g[m] = sum_{j < s} h[1 + m s + j]. It keeps the poles'
   structure exactly: if h[t] = Re sum R p^(t-1), then g[m] = Re sum R (1 - p^s) / (1 - p)
   (p^s)^m, poles p^s; and it low-passes before decimating. Stride 1 is the taps themselves.
   - The least squares (residues) and the refinement take the fit samples: box sums at the fit
     stride s = ceil(n_eff / 2k r) (at most (T - 1) // 2k r), covering h[1 .. n_eff] (at least
     2k r of them), where r = `oversample` when the window is longer than 2k taps (r = 1 and
     s = 1 otherwise).
   - The Hankel (k x k, k <= `max_size`) takes 2k samples (2k - 1, and one more for ERA's
     shifted Hankel) at the Hankel stride s_H = r s (about n_eff / 2k), each the sum of r
     consecutive fit samples. With box sums alone, a mode near the Hankel grid's Nyquist angle
     pi / s_H is nearly invisible in the samples (they alternate in sign) while its taps are
     not; the finer grid sees it, so a mode whose pole the coarse grid misplaced (aliased
     content) gets a small residue instead of a large one (measured on a large-1m filter: tap
     error 3.6 times the filter's norm with the Hankel samples as fit samples, 0.78 with r = 4).
   E.g. 1024 taps, k = 256: s_H = 1 and all 1023 taps are fit samples; 10^6 taps, k = 256,
   r = 4: s = 488, s_H = 1952, 2049 fit samples.
3. The Hankel of the samples is square and symmetric (H[i, j] depends on i + j), so its
   singular values are the absolute eigenvalues (`numpy.linalg.eigh`, batched over filters,
   float64: cheaper than an SVD, and the right singular vectors are the left ones times the
   signs).

For a filter smooth on the scale of s_H taps, the full-rate Hankel over the window is about
G / s_H (Kronecker) ones(s_H, s_H), whose singular values are those of G: the box-sum Hankel's
singular values estimate the full-rate ones with no rescaling (exact for s_H = 1). With s_H > 1
the bound below is that estimate, not a guarantee.

Order selection: the smallest N with sigma_{N+1} / sigma_1 < tol, rounded up to even (states
come in pairs); the balanced-truncation bound on the H-infinity norm of the error of an order-N
fit is 2 * sum_{i > N} sigma_i (of the windowed Hankel; the ignored tail adds at most its l1 norm).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcsm_jax.distillation import blas

# Filters per batched eigendecomposition: (block, k, k) float64 matrices, 128 MB at k = 256.
BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Window:
  """What a fit sees of F filters.

  Attributes:
    samples: (F, M) float64 fit samples: box sums of `stride` taps (zeros where not
      `complete`).
    stride: (F,) int64 taps per fit sample s.
    complete: (F, M) bool, the filter's fit samples (the least-squares rows): boxes inside the
      filter covering h[1 .. n_eff], at least 2k r of them.
    hankel: (F, 2k) float64 Hankel samples, box sums of `ratio` consecutive fit samples.
    ratio: (F,) int64 r, fit samples per Hankel sample (the Hankel stride is r s).
    effective: (F,) int64 n_eff, the taps h[1 .. n_eff] holding all but `energy_tol` of the
      energy of h[1:].
    size: k (the Hankel is k x k, built from hankel[:, :2k - 1]; ERA's shifted Hankel uses
      hankel[:, 1:]).
  """

  samples: np.ndarray
  stride: np.ndarray
  complete: np.ndarray
  hankel: np.ndarray
  ratio: np.ndarray
  effective: np.ndarray
  size: int

  @property
  def hankel_stride(self) -> np.ndarray:
    """(F,) taps per Hankel sample."""
    return self.stride * self.ratio


def hankel_size(num_taps: int, max_size: int) -> int:
  """k for a filter of `num_taps` taps (h[0] included): the largest k <= max_size with 2k
  samples from the T - 1 taps h[1:] (at stride 1 when T - 1 >= 2k)."""
  return max(0, min(int(max_size), (int(num_taps) - 1) // 2))


# Rows per chunk when streaming over (T - 1, F) taps: contiguous blocks of ~8 MB in float64.
_ROWS = 4096


def effective_lengths(tail: np.ndarray, energy_tol: float) -> np.ndarray:
  """tail (T - 1, F) = h[1:] -> (F,) n_eff in [1, T - 1] (1 for an all-zero filter).

  Two passes over contiguous row blocks (squares in float64, exact for float32 taps): the total
  energy, then the first prefix holding (1 - energy_tol) of it.
  """
  rows, filters = tail.shape
  total = np.zeros(filters)
  for r in range(0, rows, _ROWS):
    block = np.asarray(tail[r:r + _ROWS], np.float64)
    total += np.einsum("rf,rf->f", block, block)
  threshold = (1.0 - energy_tol) * total
  out = np.full(filters, rows, np.int64)
  pending = np.ones(filters, bool)
  running = np.zeros(filters)
  for r in range(0, rows, _ROWS):
    block = np.asarray(tail[r:r + _ROWS], np.float64)
    cum = running + np.cumsum(block * block, axis=0)
    done = pending & (cum[-1] >= threshold)
    if done.any():
      # first n with cum[n - 1] >= threshold: the count of smaller prefixes, plus one
      out[done] = r + (cum[:, done] < threshold[done]).sum(axis=0) + 1
      pending &= ~done
      if not pending.any():
        break
    running = cum[-1]
  return np.minimum(np.maximum(out, 1), rows)


def _box_sums(tail: np.ndarray, stride: np.ndarray, width: int) -> np.ndarray:
  """(F, width) g[m] = sum of tail[m s : (m + 1) s] (0 past the end), one pass over row blocks
  of the columns with stride > 1 (stride-1 columns are copied)."""
  rows, filters = tail.shape
  samples = np.zeros((filters, width))
  ones = np.flatnonzero(stride == 1)
  if ones.size:
    n = min(width, rows)
    samples[ones, :n] = np.asarray(tail[:n][:, ones], np.float64).T
  idx = np.flatnonzero(stride > 1)
  if not idx.size:
    return samples
  # prefix sums C[b] = sum tail[:b] at the box boundaries b = m s, m = 0 .. width
  bounds = np.minimum(np.arange(width + 1)[:, None] * stride[idx][None, :], rows)
  at = np.zeros((width + 1, idx.size))
  running = np.zeros(idx.size)
  last = int(bounds.max())
  for r in range(0, last, _ROWS):
    block = np.asarray(tail[r:r + _ROWS][:, idx], np.float64)
    cum = running + np.cumsum(block, axis=0)          # cum[i] = C[r + i + 1]
    mi, fi = np.nonzero((bounds > r) & (bounds <= r + block.shape[0]))
    at[mi, fi] = cum[bounds[mi, fi] - r - 1, fi]
    running = cum[-1]
  samples[idx] = (at[1:] - at[:-1]).T
  return samples


def window(taps: np.ndarray, *, max_size: int = 256, energy_tol: float = 1e-12,
           oversample: int = 4) -> Window:
  """The samples a fit uses, for filters taps (T, F) (tap 0 first; it is not used here)."""
  taps = np.asarray(taps)
  if taps.ndim != 2:
    raise ValueError(f"taps must be (T, F), got shape {taps.shape}.")
  num_taps, filters = taps.shape
  k = hankel_size(num_taps, max_size)
  if k < 1:
    raise ValueError(f"a Hankel window needs at least 3 taps (h[0] and 2 samples), got "
                     f"T = {num_taps}.")
  tail = taps[1:]
  rows = num_taps - 1
  effective = effective_lengths(tail, energy_tol)
  count_h = 2 * k
  # r: fit samples per Hankel sample (1 when the Hankel needs no decimation)
  ratio = np.clip(np.minimum(-(-effective // count_h), rows // count_h), 1, oversample)
  ratio = np.where(-(-effective // count_h) > 1, ratio, 1).astype(np.int64)
  # fit stride ceil(n_eff / (2k r)), at most (T - 1) // (2k r) so that 2k r boxes fit
  stride = np.clip(-(-effective // (count_h * ratio)), 1, rows // (count_h * ratio))
  stride = stride.astype(np.int64)
  count = np.minimum(rows // stride, np.maximum(count_h * ratio, -(-effective // stride)))
  width = int(count.max())
  complete = np.arange(width)[None, :] < count[:, None]
  samples = np.where(complete, _box_sums(tail, stride, width), 0.0)
  hankel = np.empty((filters, count_h))
  for r in np.unique(ratio):
    sel = np.flatnonzero(ratio == r)
    hankel[sel] = samples[sel, :count_h * r].reshape(sel.size, count_h, r).sum(-1)
  return Window(samples, stride, complete, hankel, ratio, effective, k)


def hankel_matrices(samples: np.ndarray, k: int, shift: int = 0) -> np.ndarray:
  """(F, k, k) H[f, i, j] = samples[f, i + j + shift] (a copy)."""
  view = np.lib.stride_tricks.sliding_window_view(samples[:, shift:shift + 2 * k - 1], k, axis=1)
  return np.ascontiguousarray(view[:, :k])


def hankel_eigh(samples: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of the symmetric Hankel matrices of samples (F, >= 2k - 1).

  Returns:
    eigenvalues (F, k) float64 ordered by decreasing |value| (so |value| are the singular values
    in decreasing order) and eigenvectors (F, k, k), columns in the same order.
  """
  values = np.empty((samples.shape[0], k))
  vectors = np.empty((samples.shape[0], k, k))
  for c in range(0, samples.shape[0], BLOCK):
    w, v = np.linalg.eigh(hankel_matrices(samples[c:c + BLOCK], k))
    order = np.argsort(-np.abs(w), axis=-1, kind="stable")
    values[c:c + BLOCK] = np.take_along_axis(w, order, -1)
    vectors[c:c + BLOCK] = np.take_along_axis(v, order[:, None, :], -1)
  return values, vectors


def singular_values_of_window(samples: np.ndarray, k: int) -> np.ndarray:
  """(F, k) decreasing singular values of the Hankel matrices of samples (no vectors)."""
  out = np.empty((samples.shape[0], k))
  for c in range(0, samples.shape[0], BLOCK):
    w = np.abs(np.linalg.eigvalsh(hankel_matrices(samples[c:c + BLOCK], k)))
    out[c:c + BLOCK] = -np.sort(-w, axis=-1)
  return out


def hankel_singular_values(taps, *, max_size: int = 256, energy_tol: float = 1e-12
                           ) -> np.ndarray:
  """Hankel singular values of every filter, decreasing.

  Args:
    taps: (T, S, D) filters (tap 0 first), e.g. `online_model(config).filters(params, T)[0]`.
    max_size: the largest k (a k x k Hankel); longer windows are box-summed (module docstring).
    energy_tol: the tail energy fraction of h[1:] left out of the window.

  Returns:
    (S, D, k) float64, k = min(max_size, (T - 1) // 2).
  """
  taps = np.asarray(taps)
  if taps.ndim != 3:
    raise ValueError(f"taps must be (T, S, D), got shape {taps.shape}.")
  num_taps, streams, width = taps.shape
  with blas.threads(1):
    win = window(taps.reshape(num_taps, streams * width), max_size=max_size,
                 energy_tol=energy_tol)
    sv = singular_values_of_window(win.hankel, win.size)
  return sv.reshape(streams, width, win.size)


def _ratios(sv: np.ndarray) -> np.ndarray:
  """sigma_{i+1} / sigma_1 for i = 0 .. k - 1 (0 for an all-zero filter)."""
  first = sv[..., :1]
  return np.divide(sv, first, out=np.zeros_like(sv), where=first > 0)


def select_order(sv: np.ndarray, tol: float, max_order: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The smallest N with sigma_{N+1} / sigma_1 < tol, rounded up to even, at least 2.

  Args:
    sv: (..., k) decreasing singular values.
    tol: in (0, 1).
    max_order: the largest N allowed (default k, rounded down to even); filters that need more
      get it.

  Returns:
    orders (...) int64 and reached (...) bool (False where the cap was hit before the ratio fell
    below tol; sigma_{k+1} counts as 0, so N = k always reaches it).
  """
  if not 0 < tol < 1:
    raise ValueError(f"tol must be in (0, 1), got {tol!r}.")
  k = sv.shape[-1]
  cap = k if max_order is None else min(int(max_order), k)
  cap -= cap % 2
  if cap < 2:
    raise ValueError(f"no even order N >= 2 fits a {k} x {k} Hankel window "
                     f"(max_order {max_order}).")
  ratio = np.concatenate([_ratios(sv), np.zeros(sv.shape[:-1] + (1,))], -1)  # index N: s_{N+1}
  below = ratio[..., 1:] < tol                                                # N = 1 .. k
  first = np.where(below.any(-1), below.argmax(-1) + 1, k + 1)
  orders = first + first % 2
  reached = orders <= cap
  return np.clip(orders, 2, cap).astype(np.int64), reached


def ratio_at(sv: np.ndarray, orders) -> np.ndarray:
  """sigma_{N+1} / sigma_1 per filter at its order N (0 when N >= k)."""
  ratio = np.concatenate([_ratios(sv), np.zeros(sv.shape[:-1] + (1,))], -1)
  n = np.minimum(np.broadcast_to(orders, sv.shape[:-1]), sv.shape[-1])
  return np.take_along_axis(ratio, n[..., None], -1)[..., 0]


def hankel_bound(sv: np.ndarray, orders) -> np.ndarray:
  """2 * sum_{i > N} sigma_i per filter (orders broadcast against sv.shape[:-1])."""
  index = np.arange(sv.shape[-1])
  keep = index >= np.asarray(orders)[..., None]
  return 2.0 * np.sum(np.where(keep, sv, 0.0), axis=-1)


def describe_window(win: Window) -> str:
  """A one-line summary: k, strides and effective lengths."""
  return (f"Hankel {win.size} x {win.size}, Hankel stride {int(win.hankel_stride.min())}.."
          f"{int(win.hankel_stride.max())}, fit stride {int(win.stride.min())}.."
          f"{int(win.stride.max())}, effective taps {int(win.effective.min())}.."
          f"{int(win.effective.max())}")


__all__ = ["Window", "window", "hankel_size", "effective_lengths", "hankel_matrices",
           "hankel_eigh", "singular_values_of_window", "hankel_singular_values", "select_order",
           "ratio_at", "hankel_bound", "describe_window"]
