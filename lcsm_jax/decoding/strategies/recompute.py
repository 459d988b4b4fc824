"""'recompute': the parallel forward over the whole prefix for every position, as the reference
PyTorch code generates. It keeps only the model's inputs; the prefix is padded up to a
power-of-two bucket, so the cost follows the prefix length as in the reference."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax.decoding.interfaces import IO, Steps
from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.models.interface import Carry, Prefill

Array = jax.Array


class RecomputeState(NamedTuple):
  inputs: Array  # (B, T, ...) the model's inputs, the prompt first
  offset: Array  # () P, the absolute position of online position 0


def buckets(total: int) -> list[int]:
  """Prefix lengths the forward runs at: powers of two below `total`, then `total`."""
  return sorted({min(1 << k, total) for k in range(total.bit_length() + 1)})


@dataclasses.dataclass(frozen=True)
class Recompute(base.StrategyBase):
  name: ClassVar[str] = "recompute"
  exact: ClassVar[bool] = True

  @classmethod
  def from_options(cls, options: EngineOptions, crossover=None, pallas_max=None) -> "Recompute":
    return cls()

  def prepare(self, taps: Array, aux: Any = None) -> tuple:
    return ()

  def table_layout(self, tables: tuple) -> tuple:
    return ()

  def state_layout(self, state: RecomputeState) -> RecomputeState:
    return RecomputeState(sharding.ROWS, sharding.REPLICATED)

  def init(self, tables: tuple, prompt: Array, prefill: Prefill,
           num_steps: int) -> RecomputeState:
    batch, length = prompt.shape[:2]
    inputs = jnp.zeros((batch, length + num_steps) + prompt.shape[2:], prompt.dtype)
    inputs = lax.dynamic_update_slice_in_dim(inputs, prompt, 0, axis=1)
    return RecomputeState(inputs, jnp.asarray(length, jnp.int32))

  def run(self, tables: tuple, state: RecomputeState, steps: Steps, carry: Carry, io: IO,
          start, count, num_steps: int) -> tuple[RecomputeState, Carry, IO]:
    total = state.inputs.shape[1]
    sizes = buckets(total)

    def forward(length):
      def run(inputs, t):
        outputs = steps.forward(inputs[:, :length])
        return lax.dynamic_index_in_dim(outputs, t, axis=1, keepdims=False)
      return run

    branches = [forward(length) for length in sizes]
    bucket_ends = jnp.asarray(sizes, jnp.int32)

    def body(r, loop):
      inputs, io = loop
      t = state.offset + r
      inputs = lax.dynamic_update_index_in_dim(inputs, steps.feed(io, r), t, axis=1)
      output = lax.switch(jnp.searchsorted(bucket_ends, t + 1), branches, inputs, t)
      return inputs, steps.emit(io, r, output)

    inputs, io = lax.fori_loop(start, start + count, body, (state.inputs, io))
    return state._replace(inputs=inputs), carry, io
