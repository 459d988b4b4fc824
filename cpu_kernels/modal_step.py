"""The 'modal' strategy's step on CPU in one XLA FFI custom call, updating the state in place.

Contract (the same as `modal_step_reference.py`; all float32):

  modal_step(xr, xi, poles, residues, total, a) -> (xr', xi', y)
    xr, xi:    (S, B, H, D)   the state x = xr + i xi (H poles per channel, D channels)
    poles:     (2, S, H, D)   Re p, Im p
    residues:  (2, S, H, D)   Re (R p), Im (R p)
    total:     (S, D)         Re sum_h R
    a:         (S, B, D)      this position's inputs
    y   = sum_h (Re(Rp) xr - Im(Rp) xi) + total a      (S, B, D), from the old state
    xr' = Re p xr - Im p xi + a,  xi' = Re p xi + Im p xr

XLA:CPU computes the reference as several fusions that each read the state planes and, in a
token loop, copies the planes every step. On CPU this function runs `modal_step.cc` instead:
one pass over the state, which it updates in place (the state operands are aliased to the
state results with `input_output_aliases`, so a loop-carried state is not copied). Off CPU
(`jax.lax.platform_dependent`: GPU, TPU, or `jax.export` for those platforms) it is the
reference, so a program using it still lowers everywhere.

The C++ source is compiled on first use with the system C++ compiler (see `_build.py`) and
registered as the FFI target `lcsm_modal_step`. `available()` says whether that worked. When
it did not, `modal_step` is the reference (a RuntimeWarning says why, once per process, on a
CPU backend). It is the reference too when traced inside `cpu_kernels.disabled()`.

Under `jax.vmap` the custom call runs once per mapped index (`vmap_method="sequential"`). The
custom call has no derivative rules, and XLA's SPMD partitioner does not split it: within
`jax.shard_map` it runs on each device's shards (its results vary over the mesh axes its
operands vary over).
"""

from __future__ import annotations

import pathlib
import warnings

import jax
import jax.numpy as jnp

from cpu_kernels import _build
from cpu_kernels import switch
from cpu_kernels.modal_step_reference import check_operands
from cpu_kernels.modal_step_reference import modal_step_reference

Array = jax.Array

TARGET = "lcsm_modal_step"
SYMBOL = "LcsmModalStep"
SOURCE = pathlib.Path(__file__).with_name("modal_step.cc")

KERNEL = _build.Kernel(SOURCE, TARGET, SYMBOL)
_warned: list = []  # non-empty once the unavailable kernel was warned about


def available() -> bool:
  """Whether the CPU kernel is built and registered (builds it on the first call)."""
  return KERNEL.available()


def unavailable_reason() -> str:
  """Why `available()` is False ('' when it is True)."""
  return KERNEL.unavailable_reason()


def library_path() -> pathlib.Path | None:
  """The loaded shared library (None when unavailable)."""
  return KERNEL.library_path()


def _use_kernel() -> bool:
  """Whether to trace the custom call: enabled here and available (else warns once, on a CPU
  backend, that the step is XLA's)."""
  if not switch.enabled():
    return False
  if available():
    return True
  if not _warned and jax.default_backend() == "cpu":
    _warned.append(True)
    warnings.warn("the modal step runs as XLA operations on this machine (the modal CPU kernel "
                  f"is unavailable: {unavailable_reason()}).", RuntimeWarning, stacklevel=3)
  return False


def _varying_axes(*operands) -> tuple[str, ...]:
  """The mesh axes along which any operand varies (inside `jax.shard_map`; else none)."""
  axes = set()
  for x in operands:
    kind = getattr(jax.typeof(x), "manual_axis_type", None)
    axes.update(getattr(kind, "varying", None) or ())
  return tuple(sorted(axes))


def _ffi_step(xr, xi, poles, residues, total, a):
  """The custom call: (xr', xi', y), xr' and xi' in xr's and xi's buffers."""
  state = jax.ShapeDtypeStruct(xr.shape, jnp.float32)
  y = jax.ShapeDtypeStruct(a.shape, jnp.float32)
  call = jax.ffi.ffi_call(TARGET, (state, state, y), vmap_method="sequential",
                          input_output_aliases={0: 0, 1: 1})
  out = tuple(call(xr, xi, poles, residues, total, a))
  # inside shard_map (check_vma=True) the results vary as the operands do, like the reference's
  axes = _varying_axes(xr, xi, poles, residues, total, a)
  return tuple(jax.lax.pcast(x, axes, to="varying") for x in out) if axes else out


def modal_step(xr: Array, xi: Array, poles: Array, residues: Array, total: Array,
               a: Array) -> tuple[Array, Array, Array]:
  """(xr', xi', y) (see the module docstring).

  Raises TypeError / ValueError for wrong dtypes / shapes."""
  check_operands(xr, xi, poles, residues, total, a)
  if not _use_kernel():
    return modal_step_reference(xr, xi, poles, residues, total, a)
  return tuple(jax.lax.platform_dependent(xr, xi, poles, residues, total, a, cpu=_ffi_step,
                                          default=modal_step_reference))
