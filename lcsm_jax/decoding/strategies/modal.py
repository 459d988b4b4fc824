"""'modal': the long convolutions replaced by distilled modal recurrences (Laughing Hyena
distillation; `lcsm_jax.distill`). Approximate: exact for the model whose filters are the
distilled ones, h[t] = Re sum_n R_n p_n^(t-1) for t >= 1 (h[0] and the skip term exact).

Per stream, channel and pole, the state x[t] = p x[t-1] + a[t] holds the convolution's whole
past: the pending output of position t is Re sum_n R_n x_n[t-1], so a step costs O(N) per
channel and the state is S x B x D x N/2 complex numbers (plus the S x B x D pending outputs)
whatever the length. Sequences may
grow past the model's filter length (the recurrence is defined for every t).

The prompt's state is computed in parallel: x[P-1] = sum_s p^(P-1-s) a[s], by a chunked
Vandermonde sum ('vandermonde', default: chunks of `chunk` positions, each one batched product,
carried across chunks by p^chunk) or by FFT convolution with the kernel p^t ('fft').

The step runs in real arithmetic on the state's real and imaginary planes (float32, the same
bytes as complex64), laid out (S, B, H, D) with the channels minor so that the sum over poles
adds whole rows, and carries the next position's pending outputs: Re sum R x[t] =
Re sum (R p) x[t-1] + a[t] Re sum R, read from the state before the update, so that the pending
outputs do not recompute the update. Measured on the 8 x 256 stack at N = 16 (2 cores): about 2x
faster per token than complex64 arithmetic with the pending outputs read from the new state.
On CPU the update is one custom call, `cpu_kernels.modal_step`, which reads each state element
once and writes the planes back in place (XLA's fusions read them twice and copy them per token).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import cpu_kernels
from lcsm_jax import convolution
from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.distillation.modal import ModalFilters, powers
from lcsm_jax.models.interface import OnlineModel, Prefill

Array = jax.Array

PREFILL_METHODS = ("vandermonde", "fft")


class ModalTables(NamedTuple):
  poles: Array     # (S, D, H) complex64, H = N / 2
  residues: Array  # (S, D, H) complex64
  tap0: Array      # (S, D) the model's own h[0], kept exactly
  step_poles: Array     # (2, S, H, D) float32: Re p, Im p, channels minor (the step's layout)
  step_residues: Array  # (2, S, H, D) float32: Re (R p), Im (R p), for the pending outputs
  residue_sum: Array    # (S, D) float32: Re sum_n R_n


class ModalState(NamedTuple):
  """The state after the latest fed position: x_n = x + i xi, and y = Re sum_n R_n x_n, the
  pending outputs of the next position."""
  x: Array   # (S, B, H, D) float32: the real part
  xi: Array  # (S, B, H, D) float32: the imaginary part
  y: Array   # (S, B, D) float32


def modal_state(x: Array, residues: Array) -> ModalState:
  """The ModalState of a complex state x (S, B, D, H) for residues (S, D, H)."""
  y = jnp.einsum("sbdh,sdh->sbd", x, residues).real.astype(jnp.float32)
  x = jnp.swapaxes(x, -1, -2)
  return ModalState(x.real.astype(jnp.float32), x.imag.astype(jnp.float32), y)


def prompt_state_vandermonde(poles: Array, inputs: Array, chunk: int) -> Array:
  """x[P-1] = sum_s p^(P-1-s) a[s] for inputs a (P, S, B, D) and poles (S, D, H), by chunks of
  `chunk` positions: (S, B, D, H) complex64."""
  length = inputs.shape[0]
  chunk = max(1, min(chunk, length))
  padded = -(-length // chunk) * chunk
  # zeros in front: they add nothing, and every chunk is full
  a = jnp.concatenate([jnp.zeros((padded - length,) + inputs.shape[1:], inputs.dtype), inputs])
  a = a.astype(jnp.float32).reshape((padded // chunk, chunk) + inputs.shape[1:])
  within = powers(poles, chunk)[::-1]    # (C, S, D, H): p^(C-1-j) for position j of a chunk
  across = within[0] * poles             # p^C

  def add_chunk(x, block):               # block (C, S, B, D)
    part = jnp.einsum("csbd,csdh->sbdh", block.astype(jnp.complex64), within)
    return x * across[:, None] + part, None

  x0 = jnp.zeros((inputs.shape[1], inputs.shape[2]) + poles.shape[1:], jnp.complex64)
  x, _ = lax.scan(add_chunk, x0, a)
  return x


def prompt_state_fft(poles: Array, inputs: Array) -> Array:
  """The same state by FFT: the causal convolution of a with the kernel p^t, read at P - 1."""
  length = inputs.shape[0]
  n = convolution.fft_length(2 * length)
  kernel = powers(poles, length)                                        # (P, S, D, H)
  kernel_f = jnp.fft.fft(jnp.moveaxis(kernel, 0, -1), n=n)              # (S, D, H, F)
  a_f = jnp.fft.fft(jnp.moveaxis(inputs.astype(jnp.complex64), 0, -1), n=n)  # (S, B, D, F)
  y = jnp.fft.ifft(a_f[..., None, :] * kernel_f[:, None], n=n)          # (S, B, D, H, F)
  return y[..., length - 1].astype(jnp.complex64)


@dataclasses.dataclass(frozen=True)
class Modal(base.MixingStrategy):
  """Attributes: chunk, prompt positions per chunk of the Vandermonde prefill; prefill,
  'vandermonde' or 'fft'."""

  name: ClassVar[str] = "modal"
  exact: ClassVar[bool] = False
  needs_taps: ClassVar[bool] = False
  unbounded: ClassVar[bool] = True
  supplies_filters: ClassVar[bool] = True

  chunk: int = 256
  prefill: str = "vandermonde"

  def __post_init__(self):
    if self.prefill not in PREFILL_METHODS:
      raise ValueError(f"modal prefill must be one of {PREFILL_METHODS}, got {self.prefill!r}.")

  @classmethod
  def from_options(cls, options: EngineOptions, crossover=None, pallas_max=None) -> "Modal":
    return cls(options.chunk)

  @classmethod
  def check_aux(cls, aux: Any, model: OnlineModel) -> None:
    if aux is None:
      raise ValueError("strategy 'modal' needs distilled filters: pass distilled= (from "
                       "lcsm_jax.distill(...) or a checkpoint saved with them).")
    poles, residues = getattr(aux, "poles", None), getattr(aux, "residues", None)
    if poles is None or residues is None:
      raise TypeError(f"distilled must be the result of lcsm_jax.distill (or its filters), got "
                      f"{type(aux).__name__}.")
    want = (model.num_streams, model.width)
    problems = [f"{name} has shape {tuple(x.shape)}, the model needs {want + ('N/2',)}"
                for name, x in (("poles", poles), ("residues", residues))
                if x.ndim != 3 or tuple(x.shape[:2]) != want]
    if not problems and poles.shape != residues.shape:
      problems.append(f"poles {tuple(poles.shape)} and residues {tuple(residues.shape)} differ")
    if problems:
      raise ValueError("distilled filters do not match the model (another model or config?): "
                       + "; ".join(problems) + ".")

  def prepare(self, taps: Array, aux: Any = None) -> ModalTables:
    poles = jnp.asarray(aux.poles, jnp.complex64)
    residues = jnp.asarray(aux.residues, jnp.complex64)
    def planes(z):  # (S, D, H) complex -> (2, S, H, D) float32
      z = jnp.swapaxes(z, -1, -2)
      return jnp.stack([z.real, z.imag]).astype(jnp.float32)

    return ModalTables(poles, residues, taps[0], planes(poles), planes(residues * poles),
                       jnp.sum(residues.real, -1).astype(jnp.float32))

  def aux_layout(self, aux: Any) -> Any:
    return jax.tree.map(lambda x: sharding.SPECTRA if jnp.ndim(x) >= 2 else sharding.REPLICATED,
                        aux)

  def table_layout(self, tables: ModalTables) -> ModalTables:
    return ModalTables(sharding.SPECTRA, sharding.SPECTRA, sharding.SPECTRA,
                       sharding.STEP_PLANES, sharding.STEP_PLANES, sharding.SPECTRA)

  def state_layout(self, state: ModalState) -> ModalState:
    return ModalState(sharding.MODES, sharding.MODES, sharding.STREAMS)

  def prefill_taps(self, tables: ModalTables, length: int) -> Array:
    # tap 0 is the model's own h[0], as in the steps' diagonal
    return ModalFilters(tables.poles, tables.residues, tables.tap0).taps(length)

  def init(self, tables: ModalTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> ModalState:
    inputs = prefill.conv_inputs  # (P, S, B, D)
    if inputs.shape[0] == 0:
      shape = (inputs.shape[1], inputs.shape[2]) + tables.poles.shape[1:]
      x = jnp.zeros(shape, jnp.complex64)
    elif self.prefill == "fft":
      x = prompt_state_fft(tables.poles, inputs)
    else:
      x = prompt_state_vandermonde(tables.poles, inputs, self.chunk)
    return modal_state(x, tables.residues)

  def pending(self, tables: ModalTables, state: ModalState, r) -> Array:
    return state.y

  def update(self, tables: ModalTables, state: ModalState, r, inputs: Array,
             num_steps: int) -> ModalState:
    # y = sum_h (Re(Rp) x - Im(Rp) xi) + a Re sum R; x' = p x + a (cpu_kernels.modal_step:
    # on CPU one custom call updating the state planes in place, else the same XLA operations)
    x, xi, y = cpu_kernels.modal_step(state.x, state.xi, tables.step_poles,
                                      tables.step_residues, tables.residue_sum,
                                      inputs.astype(jnp.float32))
    return ModalState(x, xi, y)
