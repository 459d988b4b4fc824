"""'lazy': each pending output is a dot product of the filter with all earlier inputs, O(t) per
position, reading only [0, t) of the stored history in chunks.

Its tables are the model's filters as they are, read backwards window by window (no reversed
copy), and they are also the prefill's filters: at 2^20 positions of an 8 x 256 model the taps
and the history are 8 GiB each, and a second copy of either does not fit in 24 GiB."""

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
  history: Array  # (chunk + prompt and steps rounded up to a multiple of the chunk, S, B, D):
                  # `chunk` zero rows, then position s at row chunk + s
  offset: Array   # () P, the absolute position of online position 0


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
    return LazyState(sharding.TIME_MAJOR, sharding.REPLICATED)

  def prefill_taps(self, tables: LazyTables, length: int) -> Array:
    # the model's filters as prepare received them: the model's own parameters for them can go
    return tables.taps[:length]

  def chunk_for(self, taps: int) -> int:
    """The chunk used with `taps` filter rows: `chunk`, or the largest power of two <= taps
    if fewer (a window of taps must fit in the table)."""
    return min(self.chunk, 1 << (taps.bit_length() - 1))

  def init(self, tables: LazyTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> LazyState:
    length, streams, batch, width = prefill.conv_inputs.shape
    chunk = self.chunk_for(tables.taps.shape[0])
    padded = -(-(length + num_steps) // chunk) * chunk
    history = jnp.zeros((chunk + padded, streams, batch, width), jnp.float32)
    history = lax.dynamic_update_slice_in_dim(
        history, prefill.conv_inputs.astype(jnp.float32), chunk, 0)
    return LazyState(history, jnp.asarray(length, jnp.int32))

  def pending(self, tables: LazyTables, state: LazyState, r) -> Array:
    """sum_{s < t} taps[t - s] x[s], t = P + r, by chunks of history rows [cC, cC + C) and the
    taps window [t - cC - C + 1, t - cC] read backwards. The last chunk's window would start
    before tap 0: it is moved down by e rows, to start at tap 0, with the history window
    (the chunk zero rows in front keep it in range), and its first e rows, counted by the
    previous chunk, are masked."""
    chunk = self.chunk_for(tables.taps.shape[0])
    t = state.offset + r
    rows = lax.broadcasted_iota(jnp.int32, (chunk, 1, 1, 1), 0)

    def add_chunk(c, acc):
      start = c * chunk
      shift = jnp.maximum(0, start + chunk - 1 - t)
      a = lax.dynamic_slice_in_dim(state.history, chunk + start - shift, chunk, axis=0)
      rho = lax.dynamic_slice_in_dim(tables.taps, t - start + shift - chunk + 1, chunk, 0)
      a = jnp.where(rows >= shift, a, 0.0)
      return acc + sum_rows(a * rho[::-1, :, None, :])

    zeros = jnp.zeros(state.history.shape[1:], jnp.float32)
    return lax.fori_loop(0, (t + chunk - 1) // chunk, add_chunk, zeros)

  def update(self, tables: LazyTables, state: LazyState, r, inputs: Array,
             num_steps: int) -> LazyState:
    chunk = self.chunk_for(tables.taps.shape[0])
    return state._replace(history=base.write_row(state.history, chunk + state.offset + r,
                                                 inputs))
