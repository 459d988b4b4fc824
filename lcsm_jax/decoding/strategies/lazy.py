"""'lazy': each pending output is a dot product of the filter with all earlier inputs, O(t) per
position, reading the stored inputs in chunks.

Its tables are the model's filters as they are, read backwards window by window (no reversed
copy), and they are also the prefill's filters. The state keeps the prompt's inputs as the
prefill made them and the online inputs in a buffer of their own: at 2^20 positions of an
8 x 256 model the taps and the inputs are 8 GiB each, and a second copy of either (a reversed
table, or the prompt's inputs copied into a longer buffer) does not fit in 24 GiB."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.models.interface import Prefill

Array = jax.Array


class LazyTables(NamedTuple):
  taps: Array  # (T, S, D) float32: the model's filters as they are (no reversed copy)


class LazyState(NamedTuple):
  prompt: Array  # (P, S, B, D): the prompt's inputs, as the prefill made them
  online: Array  # (chunk + the steps rounded up to a multiple of the chunk, S, B, D): `chunk`
                 # zero rows, then online position r at row chunk + r


def sum_rows(x: Array) -> Array:
  """x.sum(axis=0) for a power-of-two number of rows, as a tree of contiguous row-block adds:
  XLA on the CPU reduces the leading axis of a time-major buffer at under 1 GB/s, while these
  adds run at memory speed (measured in WORKSPACE.md)."""
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0]


@dataclasses.dataclass(frozen=True)
class Lazy(base.MixingStrategy):
  """Attributes: chunk, positions per inner iteration (a power of two)."""

  name: ClassVar[str] = "lazy"
  exact: ClassVar[bool] = True
  supplies_filters: ClassVar[bool] = True

  chunk: int = 256

  def __post_init__(self):
    if self.chunk < 1 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk must be a power of two, got {self.chunk}.")

  @classmethod
  def from_options(cls, options: EngineOptions, crossover=None, pallas_max=None) -> "Lazy":
    return cls(options.chunk)

  def prepare(self, taps: Array, aux: Any = None) -> LazyTables:
    return LazyTables(taps.astype(jnp.float32))

  def table_layout(self, tables: LazyTables) -> LazyTables:
    return LazyTables(sharding.TAPS)

  def state_layout(self, state: LazyState) -> LazyState:
    return LazyState(sharding.TIME_MAJOR, sharding.TIME_MAJOR)

  def prefill_taps(self, tables: LazyTables, length: int) -> Array:
    # the model's filters as prepare received them: the model's own parameters for them can go.
    # All of them: models read the first `length` (a slice here would be a copy of them)
    return tables.taps

  def init(self, tables: LazyTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> LazyState:
    inputs = prefill.conv_inputs.astype(jnp.float32)
    chunk = chunk_for(self.chunk, tables.taps.shape[0])
    rows = chunk + -(-num_steps // chunk) * chunk
    return LazyState(inputs, jnp.zeros((rows,) + inputs.shape[1:], jnp.float32))

  def pending(self, tables: LazyTables, state: LazyState, r) -> Array:
    """sum_{s < t} taps[t - s] x[s] at t = P + r: the prompt's part and the online part."""
    length = state.prompt.shape[0]
    total = online_sum(tables.taps, state.online, r, chunk_for(self.chunk, tables.taps.shape[0]))
    if length:
      total = total + prompt_sum(tables.taps, state.prompt, length + r,
                                 chunk_for(self.chunk, min(length, tables.taps.shape[0])))
    return total

  def update(self, tables: LazyTables, state: LazyState, r, inputs: Array,
             num_steps: int) -> LazyState:
    chunk = chunk_for(self.chunk, tables.taps.shape[0])
    return state._replace(online=base.write_row(state.online, chunk + r, inputs))


def chunk_for(chunk: int, rows: int) -> int:
  """`chunk`, or the largest power of two <= rows if fewer (a window must fit in `rows`)."""
  return min(chunk, 1 << (rows.bit_length() - 1))


def _window_sum(taps: Array, inputs: Array, first_row, taps_end, skip, chunk: int) -> Array:
  """sum_j taps[taps_end - j] inputs[first_row + j] over the rows j in [skip, chunk) of one
  window (rows j < skip, counted by the previous window, masked)."""
  a = lax.dynamic_slice_in_dim(inputs, first_row, chunk, axis=0)
  rho = lax.dynamic_slice_in_dim(taps, taps_end - chunk + 1, chunk, axis=0)
  rows = lax.broadcasted_iota(jnp.int32, (chunk,) + (1,) * (a.ndim - 1), 0)
  return sum_rows(jnp.where(rows >= skip, a, 0.0) * rho[::-1, :, None, :])


def prompt_sum(taps: Array, prompt: Array, t, chunk: int) -> Array:
  """sum_{s < P} taps[t - s] prompt[s] (t >= P), by windows of the prompt's rows [cC, cC + C);
  the last, past the prompt's end when C does not divide P, is moved back to end at P."""
  length = prompt.shape[0]

  def add_chunk(c, acc):
    start = c * chunk
    shift = jnp.maximum(0, start + chunk - length)
    first = start - shift
    return acc + _window_sum(taps, prompt, first, t - first, shift, chunk)

  zeros = jnp.zeros(prompt.shape[1:], jnp.float32)
  return lax.fori_loop(0, -(-length // chunk), add_chunk, zeros)


def online_sum(taps: Array, online: Array, r, chunk: int) -> Array:
  """sum_{j < r} taps[r - j] y[j] for the online inputs y (row chunk + j of `online`), by
  windows of rows [cC, cC + C) and the taps [r - cC - C + 1, r - cC] read backwards. The last
  window would start before tap 0: it is moved down by e rows, to start at tap 0, with the
  rows' window (the `chunk` zero rows in front keep it in range), and its first e rows,
  counted by the previous window, are masked."""

  def add_chunk(c, acc):
    start = c * chunk
    shift = jnp.maximum(0, start + chunk - 1 - r)
    return acc + _window_sum(taps, online, chunk + start - shift, r - start + shift, shift,
                             chunk)

  zeros = jnp.zeros(online.shape[1:], jnp.float32)
  return lax.fori_loop(0, (r + chunk - 1) // chunk, add_chunk, zeros)
