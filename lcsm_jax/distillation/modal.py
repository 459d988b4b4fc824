"""Distilled filters in modal form (Laughing Hyena convention) and the StripedHyena convention.

A long filter h (T taps) of one stream s and channel d is approximated for t >= 1 by N / 2
complex poles p_n and residues R_n (conjugate pairs implied by the real part):

  h[0] = h0[s, d]                                        (kept exactly)
  h[t] ~ Re sum_n residues[s, d, n] * poles[s, d, n] ** (t - 1),   t >= 1.

N = 2 * poles.shape[-1] is the number of real states. Unused slots hold pole 0 and residue 0
(they contribute nothing: 0 ** 0 = 1 times residue 0). A used slot may hold pole 0 with a nonzero
residue: an FIR term, R at t = 1 only. A real pole occupies one slot with a real residue
(Re(R p^(t-1)) = Re(R) p^(t-1) when p is real), so it costs two real states like a pair.

With x_n[t] = p_n x_n[t-1] + a[t], the convolution is y[t] = h0 a[t] + Re sum_n R_n x_n[t-1]
(the model adds its skip term to h0 as the diagonal).

StripedHyena (togethercomputer/stripedhyena `engine.py`, `step_iir`) writes the same filter as
h_sh[t] = Re sum R_sh p^t for t >= 0 with a separate skip D (y += D x), so that:

  ours -> theirs:  R_sh = R / p,  D = h0 + skip - Re sum_n R_n / p_n
  theirs -> ours:  R = R_sh p,    h0 = D + Re sum_n R_sh,n - skip

(taps t >= 1: Re sum R_sh p^t = Re sum (R / p) p^t = Re sum R p^(t-1); tap 0: D + Re sum R_sh =
h0 + skip, the model's diagonal.) A slot with p = 0 and R = 0 maps to R_sh = 0 and back. A slot
with p = 0 and R != 0 (an FIR term at tap 1 only) has no StripedHyena equivalent: refused.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def powers(base: Array, count: int) -> Array:
  """(count, *base.shape): base ** j for j = 0 .. count - 1.

  A parallel prefix product (`lax.associative_scan`): each power is a product of O(log count)
  factors, so its relative error is O(log count) ulps (a sequential product: O(count); exp(j log
  p): O(j) ulps of log p, which is 6% at j = 10^6 in float32 for |p| near 1). Exact for base 0.
  """
  if count < 1:
    raise ValueError(f"powers needs count >= 1, got {count}.")
  x = jnp.broadcast_to(base, (count,) + base.shape)
  x = x.at[0].set(jnp.ones_like(base))
  return lax.associative_scan(jnp.multiply, x, axis=0)


def _chunk_size(rows: int) -> int:
  return 1 << max(0, math.ceil(math.log2(math.sqrt(rows))))


@flax.struct.dataclass
class ModalFilters:
  """h[t] ~ Re sum_n residues[s, d, n] * poles[s, d, n] ** (t - 1) for t >= 1 (h[0] exact).

  Attributes:
    poles: (S, D, N/2) complex64, |poles| < 1; unused slots: pole 0, residue 0.
    residues: (S, D, N/2) complex64.
    h0: (S, D) float32: the filter's tap 0 (kept exactly; the model's skip term is not in it).
  """

  poles: Array
  residues: Array
  h0: Array

  @property
  def order(self) -> int:
    """N, the number of real states per filter (2 per complex slot)."""
    return 2 * self.poles.shape[-1]

  @property
  def num_streams(self) -> int:
    return self.poles.shape[0]

  @property
  def width(self) -> int:
    return self.poles.shape[1]

  def taps(self, length: int, dtype=None) -> Array:
    """The materialised filters (length, S, D): row 0 = h0, rows t >= 1 = Re sum R p^(t-1).

    Args:
      length: T >= 1.
      dtype: the real output dtype; default float32 for complex64 poles (float64 for complex128
        poles). float64 (complex128 arithmetic on the stored values) needs x64, e.g. inside
        `with jax.enable_x64(True):`.

    Powers are built in two levels, p^(qC + j) = (p^C)^q p^j with C ~ sqrt(length), each level a
    parallel prefix product (`powers`), and every filter's (length / C, C) block of taps is one
    rank-N/2 matrix product: the temporaries are O(sqrt(length) S D N) plus the output and one
    transposed copy of it (no (length, S, D, N/2) array).

    Accuracy: a power p^t computed in floating point from the stored p carries a relative error
    of up to ~t ulps (any evaluation that raises a rounded intermediate power does), so in
    float32 the taps of poles near the unit circle lose accuracy with t (measured: 2e-5 of the
    largest tap at t = 2^16 for 1 - |p| ~ 1e-4). Use dtype=float64 for reference values.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
      raise ValueError(f"length must be an integer >= 1, got {length!r}.")
    length = int(length)
    poles = jnp.asarray(self.poles)
    if dtype is not None:
      real = jnp.dtype(dtype)
      if real not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype must be float32 or float64, got {real}.")
      if real == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs 64-bit JAX: call taps inside "
                         "`with jax.enable_x64(True):`.")
      poles = poles.astype(jnp.complex64 if real == jnp.float32 else jnp.complex128)
    real = jnp.zeros((), poles.dtype).real.dtype
    h0 = jnp.asarray(self.h0).astype(real)[None]
    rows = length - 1
    if rows == 0:
      return h0
    num_streams, width, slots = poles.shape
    filters = num_streams * width
    chunk = _chunk_size(rows)
    blocks = -(-rows // chunk)
    fine = powers(poles, chunk)                                    # (C, S, D, n): p^j
    coarse = jnp.asarray(self.residues).astype(poles.dtype) * powers(fine[-1] * poles,
                                                                      blocks)  # R p^(qC)
    # Re(a b) = Re a Re b - Im a Im b: one real product contracting 2n.
    a = jnp.concatenate([coarse.real, -coarse.imag], -1).reshape(blocks, filters, 2 * slots)
    b = jnp.concatenate([fine.real, fine.imag], -1).reshape(chunk, filters, 2 * slots)
    out = jnp.einsum("qfk,jfk->qjf", a, b, precision=lax.Precision.HIGHEST)
    out = out.reshape(blocks * chunk, num_streams, width)[:rows]
    return jnp.concatenate([h0, out], axis=0)


def _numpy_filters(filters: ModalFilters):
  return (np.asarray(filters.poles).astype(np.complex128),
          np.asarray(filters.residues).astype(np.complex128),
          np.asarray(filters.h0).astype(np.float64))


def to_stripedhyena(filters: ModalFilters, skip) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Our modal filters plus the model's skip term in the StripedHyena convention.

  Args:
    filters: ModalFilters (S, D, N/2).
    skip: (S, D) the layer's skip term (the model's diagonal is h0 + skip).

  Returns:
    poles (S, D, N/2) complex64 (unchanged), residues_sh = R / p (S, D, N/2) complex64, and
    D = h0 + skip - Re sum R / p (S, D) float32, computed in float64 and rounded once. (Per
    block s, StripedHyena's engine reads `view_as_complex` tensors of shape (D, N/2, 1): add a
    trailing axis.) Slots with p = 0 and R = 0 give R_sh = 0.

  Raises:
    ValueError: a slot with pole 0 and a nonzero residue (not representable), or a slot whose
      R / p overflows float32 (a pole too close to 0 for its residue).
  """
  poles, residues, h0 = _numpy_filters(filters)
  skip = np.asarray(skip, np.float64)
  if skip.shape != h0.shape:
    raise ValueError(f"skip has shape {skip.shape}, expected (S, D) = {h0.shape}.")
  zero = poles == 0
  bad = zero & (residues != 0)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{int(bad.sum())} slot(s) have pole 0 with a nonzero residue (first at "
                     f"[stream, channel, slot] = {list(where)}, residue {residues[where]}): an "
                     "FIR term at tap 1 that the StripedHyena convention (R p^t) cannot express.")
  residues_sh = np.where(zero, 0, residues / np.where(zero, 1, poles))
  big = ~np.isfinite(residues_sh.astype(np.complex64))
  if big.any():
    where = tuple(int(i) for i in np.argwhere(big)[0])
    raise ValueError(f"R / p overflows float32 at [stream, channel, slot] = {list(where)} (pole "
                     f"{poles[where]}, residue {residues[where]}).")
  d = h0 + skip - residues_sh.real.sum(-1)
  return poles.astype(np.complex64), residues_sh.astype(np.complex64), d.astype(np.float32)


def from_stripedhyena(poles, residues_sh, d, skip) -> ModalFilters:
  """The inverse of `to_stripedhyena`: R = R_sh p, h0 = D + Re sum R_sh - skip.

  Args:
    poles, residues_sh: (S, D, N/2) complex (StripedHyena's h[t] = Re sum R_sh p^t, t >= 0).
    d: (S, D) StripedHyena's skip D; skip: (S, D) the model's skip term.

  Returns:
    ModalFilters (poles complex64, residues complex64, h0 float32; arithmetic in float64). A
    StripedHyena slot with pole 0 only acts at t = 0: it moves into h0 and gets residue 0.
  """
  poles = np.asarray(poles).astype(np.complex128)
  residues_sh = np.asarray(residues_sh).astype(np.complex128)
  d = np.asarray(d, np.float64)
  skip = np.asarray(skip, np.float64)
  if poles.ndim != 3 or poles.shape != residues_sh.shape:
    raise ValueError(f"poles {poles.shape} and residues {residues_sh.shape} must both be "
                     "(S, D, N/2).")
  if d.shape != poles.shape[:2] or skip.shape != poles.shape[:2]:
    raise ValueError(f"D {d.shape} and skip {skip.shape} must be (S, D) = {poles.shape[:2]}.")
  residues = residues_sh * poles
  h0 = d + residues_sh.real.sum(-1) - skip
  return ModalFilters(jnp.asarray(poles, jnp.complex64), jnp.asarray(residues, jnp.complex64),
                      jnp.asarray(h0, jnp.float32))
