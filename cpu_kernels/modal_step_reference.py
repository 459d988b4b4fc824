"""Plain-JAX reference for the 'modal' strategy's step of `modal_step.py`.

Contract (all float32; S streams, B batch rows, H poles per channel, D channels):

  xr, xi:    (S, B, H, D)   the state x = xr + i xi
  poles:     (2, S, H, D)   Re p, Im p
  residues:  (2, S, H, D)   Re (R p), Im (R p) (the step residues)
  total:     (S, D)         Re sum_h R
  a:         (S, B, D)      this position's inputs
  returns (xr', xi', y):
    y   = sum_h (Re(Rp) xr - Im(Rp) xi) + total a      (S, B, D): the next pending outputs,
                                                        Re sum_h R x', from the old state
    xr' = Re p xr - Im p xi + a                          (S, B, H, D)
    xi' = Re p xi + Im p xr                              (S, B, H, D)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NAMES = ("xr", "xi", "poles", "residues", "total", "a")


def check_operands(xr, xi, poles, residues, total, a) -> tuple[int, int, int, int]:
  """Validates the contract's shapes and dtypes and returns (S, B, H, D)."""
  operands = (xr, xi, poles, residues, total, a)
  for name, x in zip(NAMES, operands):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"modal_step: {name} must be an array; got {type(x).__name__}.")
    if jnp.dtype(x.dtype) != jnp.float32:
      raise TypeError(f"modal_step: {name} must be float32; got {jnp.dtype(x.dtype)}.")
  if len(xr.shape) != 4:
    raise ValueError(f"modal_step: xr must be (S, B, H, D); got shape {tuple(xr.shape)}.")
  s, b, h, d = (int(n) for n in xr.shape)
  want = {"xi": (s, b, h, d), "poles": (2, s, h, d), "residues": (2, s, h, d),
          "total": (s, d), "a": (s, b, d)}
  layout = {"xi": "(S, B, H, D)", "poles": "(2, S, H, D)", "residues": "(2, S, H, D)",
            "total": "(S, D)", "a": "(S, B, D)"}
  for name, x in zip(NAMES[1:], operands[1:]):
    if tuple(x.shape) != want[name]:
      raise ValueError(f"modal_step: {name} must be {layout[name]} = {want[name]} for xr "
                       f"(S, B, H, D) = {(s, b, h, d)}; got shape {tuple(x.shape)}.")
  return s, b, h, d


def modal_step_reference(xr: Array, xi: Array, poles: Array, residues: Array, total: Array,
                         a: Array) -> tuple[Array, Array, Array]:
  """(xr', xi', y) of the module docstring by XLA operations."""
  check_operands(xr, xi, poles, residues, total, a)
  pr, pi = poles[:, :, None]          # (S, 1, H, D) each
  rr, ri = residues[:, :, None]
  y = jnp.sum(rr * xr - ri * xi, -2) + total[:, None] * a
  return pr * xr - pi * xi + a[:, :, None], pr * xi + pi * xr, y
