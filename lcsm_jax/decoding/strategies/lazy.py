"""'lazy': each pending output is a dot product of the filter with all earlier inputs, O(t) per
position, reading only [0, t) of the stored history in chunks."""

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
  reversed_taps: Array  # (T + chunk, S, D): reversed_taps[m] = taps[T - 1 - m], zeros for m >= T


class LazyState(NamedTuple):
  history: Array  # (T rounded up to a multiple of the chunk, S, B, D), prompt first
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

  chunk: int = 256

  def __post_init__(self):
    if self.chunk < 1 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk must be a power of two, got {self.chunk}.")

  @classmethod
  def from_options(cls, options: EngineOptions, crossover=None, pallas_max=None) -> "Lazy":
    return cls(options.chunk)

  def prepare(self, taps: Array, aux: Any = None) -> LazyTables:
    pad = jnp.zeros((self.chunk,) + taps.shape[1:], jnp.float32)
    return LazyTables(jnp.concatenate([taps[::-1].astype(jnp.float32), pad]))

  def table_layout(self, tables: LazyTables) -> LazyTables:
    return LazyTables(sharding.TAPS)

  def state_layout(self, state: LazyState) -> LazyState:
    return LazyState(sharding.TIME_MAJOR, sharding.REPLICATED)

  def init(self, tables: LazyTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> LazyState:
    length, streams, batch, width = prefill.conv_inputs.shape
    padded = -(-(length + num_steps) // self.chunk) * self.chunk
    history = jnp.zeros((padded, streams, batch, width), jnp.float32)
    history = lax.dynamic_update_slice_in_dim(
        history, prefill.conv_inputs.astype(jnp.float32), 0, 0)
    return LazyState(history, jnp.asarray(length, jnp.int32))

  def pending(self, tables: LazyTables, state: LazyState, r) -> Array:
    total = tables.reversed_taps.shape[0] - self.chunk
    t = state.offset + r

    def add_chunk(c, acc):
      start = c * self.chunk
      a = lax.dynamic_slice_in_dim(state.history, start, self.chunk, axis=0)
      rho = lax.dynamic_slice_in_dim(tables.reversed_taps, total - 1 - t + start, self.chunk, 0)
      return acc + sum_rows(a * rho[:, :, None, :])

    zeros = jnp.zeros(state.history.shape[1:], jnp.float32)
    return lax.fori_loop(0, (t + self.chunk - 1) // self.chunk, add_chunk, zeros)

  def update(self, tables: LazyTables, state: LazyState, r, inputs: Array,
             num_steps: int) -> LazyState:
    return state._replace(history=base.write_row(state.history, state.offset + r, inputs))
