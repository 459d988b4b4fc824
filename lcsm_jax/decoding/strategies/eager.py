"""'eager': each new input pushes its contribution into every later pending output, O(M - r)
per position, in chunks."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax.decoding import prompt as prompt_lib
from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.models.interface import Prefill

Array = jax.Array


class EagerTables(NamedTuple):
  taps: Array  # (T + chunk, S, D), zero-padded


class EagerState(NamedTuple):
  outputs: Array  # (M rounded up to a chunk, plus one chunk, S, B, D) pending outputs


@dataclasses.dataclass(frozen=True)
class Eager(base.MixingStrategy):
  """Attributes: chunk, positions per inner iteration."""

  name: ClassVar[str] = "eager"
  exact: ClassVar[bool] = True

  chunk: int = 256

  @classmethod
  def from_options(cls, options: EngineOptions, crossover=None, pallas_max=None) -> "Eager":
    return cls(options.chunk)

  def prepare(self, taps: Array, aux: Any = None) -> EagerTables:
    pad = jnp.zeros((self.chunk,) + taps.shape[1:], jnp.float32)
    return EagerTables(jnp.concatenate([taps.astype(jnp.float32), pad]))

  def table_layout(self, tables: EagerTables) -> EagerTables:
    return EagerTables(sharding.TAPS)

  def state_layout(self, state: EagerState) -> EagerState:
    return EagerState(sharding.TIME_MAJOR)

  def init(self, tables: EagerTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> EagerState:
    contribution = prompt_lib.prompt_contribution(prefill.conv_inputs, tables.taps, num_steps)
    padded = (-(-num_steps // self.chunk) + 1) * self.chunk
    outputs = jnp.zeros((padded,) + contribution.shape[1:], jnp.float32)
    return EagerState(lax.dynamic_update_slice_in_dim(outputs, contribution, 0, 0))

  def pending(self, tables: EagerTables, state: EagerState, r) -> Array:
    return base.read_row(state.outputs, r)

  def update(self, tables: EagerTables, state: EagerState, r, inputs: Array,
             num_steps: int) -> EagerState:
    a = inputs.astype(jnp.float32)

    def push_chunk(c, outputs):
      start = c * self.chunk
      rho = lax.dynamic_slice_in_dim(tables.taps, 1 + start, self.chunk, axis=0)
      rows = a[None] * rho[:, :, None, :]
      current = lax.dynamic_slice_in_dim(outputs, r + 1 + start, self.chunk, axis=0)
      return lax.dynamic_update_slice_in_dim(outputs, current + rows, r + 1 + start, axis=0)

    trips = (num_steps - 1 - r + self.chunk - 1) // self.chunk
    return EagerState(lax.fori_loop(0, trips, push_chunk, state.outputs))
