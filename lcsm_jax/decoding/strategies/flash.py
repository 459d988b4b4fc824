"""'flash': the Flash Inference tiling, O(L log^2 L) (see `decoding/schedule.py`).

After the step at online position r, with i = r + 1, the block of size U = lowbit(i) adds the
contribution of inputs [i - U, i) to outputs [i, i + U), by direct products for small U and by
FFTs (with the filter's spectrum precomputed) for large U; all streams, batch rows and channels
of a block are one batched computation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax.decoding import blocks as blocks_lib
from lcsm_jax.decoding import prompt as prompt_lib
from lcsm_jax.decoding import schedule
from lcsm_jax.decoding import sharding
from lcsm_jax.decoding.options import EngineOptions
from lcsm_jax.decoding.strategies import base
from lcsm_jax.models.interface import Prefill

Array = jax.Array


class FlashTables(NamedTuple):
  taps: Array                # (T, S, D)
  spectra: dict[int, Array]  # {U: (S, D, U + 1)} for the precomputed FFT block sizes


class FlashState(NamedTuple):
  """Rings of R = `schedule.ring_rows` rows; online position r lives in row r mod R."""

  inputs: Array          # (R, S, B, D) inputs of the last R online positions
  outputs: Array         # (R, S, B, D) pending block outputs of the next R positions
  prompt_inputs: Array   # (P, S, B, D) for 0 < P <= DIRECT_PROMPT_MAX (else 0 rows): the
                         # prompt's contribution is added at every step by P products
  prompt_outputs: Array  # (M, S, B, D) the prompt's contribution to every online position, for
                         # P > DIRECT_PROMPT_MAX (else 0 rows)


@dataclasses.dataclass(frozen=True)
class Flash(base.MixingStrategy):
  """The tiled schedule.

  Attributes:
    options: the engine's options (tau, layer_parallel, precomputed_spectra,
      spectra_max_size, group_bytes are flash's).
    crossover: this machine's direct/FFT crossover, which resolves tau='auto' (None: not
      resolved, allowed for `prepare`, which then keeps spectra for every size).
    pallas_max: on accelerators with a measured table, the Pallas kernel for blocks up to this
      size under tau='auto'.
  """

  name: ClassVar[str] = "flash"
  exact: ClassVar[bool] = True

  options: EngineOptions = EngineOptions()
  crossover: int | None = None
  pallas_max: int | None = None

  @classmethod
  def from_options(cls, options: EngineOptions, crossover: int | None = None,
                   pallas_max: int | None = None) -> "Flash":
    if options.tau != "auto":
      crossover = pallas_max = None
    return cls(options, crossover, pallas_max)

  @property
  def tau(self):
    """The resolved tau: `options.tau`, or the crossover for 'auto' ('auto' if unresolved)."""
    if self.options.tau == "auto" and self.crossover is not None:
      return self.crossover
    return self.options.tau

  @classmethod
  def needs_crossover(cls, options: EngineOptions) -> bool:
    return options.tau == "auto"

  def block_config(self, num_steps: int) -> blocks_lib.BlockConfig:
    return blocks_lib.block_config(schedule.block_sizes(num_steps), self.tau,
                                   pallas_max=self.pallas_max,
                                   layer_parallel=self.options.layer_parallel)

  def spectrum_sizes(self, length: int) -> list[int]:
    """Block sizes whose filter spectra `prepare` computes: every size a plan within `length`
    positions uses that may run by FFT (with tau='auto', every size) up to spectra_max_size."""
    if not self.options.precomputed_spectra:
      return []
    limit = self.options.spectra_max_size
    sizes = [s for s in schedule.block_sizes(length) if limit is None or s <= limit]
    if self.tau == "auto":
      return sizes
    return [s for s in sizes if blocks_lib.method_for(s, self.tau, self.pallas_max) == "fft"]

  def prepare(self, taps: Array, aux: Any = None) -> FlashTables:
    return FlashTables(taps, blocks_lib.spectra_for(taps, self.spectrum_sizes(taps.shape[0])))

  def table_layout(self, tables: FlashTables) -> FlashTables:
    return FlashTables(sharding.TAPS, {size: sharding.SPECTRA for size in tables.spectra})

  def state_layout(self, state: FlashState) -> FlashState:
    return FlashState(*(sharding.TIME_MAJOR,) * 4)

  def init(self, tables: FlashTables, prompt: Array, prefill: Prefill,
           num_steps: int) -> FlashState:
    length, streams, batch, width = prefill.conv_inputs.shape
    rows = schedule.ring_rows(schedule.FlashPlan(num_steps))
    zeros = lambda n: jnp.zeros((n, streams, batch, width), jnp.float32)
    if 0 < length <= prompt_lib.DIRECT_PROMPT_MAX:
      prompt_state = (prefill.conv_inputs.astype(jnp.float32), zeros(0))
    else:
      prompt_state = (zeros(0), prompt_lib.prompt_contribution(prefill.conv_inputs,
                                                                tables.taps, num_steps))
    return FlashState(zeros(rows), zeros(rows), *prompt_state)

  def pending(self, tables: FlashTables, state: FlashState, r) -> Array:
    ring = state.outputs.shape[0]
    out = base.read_row(state.outputs, r % ring)
    if state.prompt_outputs.shape[0]:
      out = out + base.read_row(state.prompt_outputs, r)
    if state.prompt_inputs.shape[0]:
      out = out + prompt_lib.prompt_products(state.prompt_inputs, tables.taps, r, 1)[0]
    return out

  def update(self, tables: FlashTables, state: FlashState, r, inputs: Array,
             num_steps: int) -> FlashState:
    """Records the inputs of position r, frees its (already read) pending-output row, then
    adds every block whose inputs end at r + 1."""
    plan = schedule.FlashPlan(num_steps)
    blocks = self.block_config(num_steps)
    ring = state.inputs.shape[0]
    state = state._replace(inputs=base.write_row(state.inputs, r % ring, inputs),
                           outputs=base.write_row(state.outputs, r % ring,
                                                  jnp.zeros_like(inputs)))
    i = r + 1
    for level in range(plan.num_levels):
      # A loop of zero or one trip per level; its body depends on the trip index j (always 0)
      # so that XLA cannot hoist the block out of the token loop.
      block = lambda j, s, level=level: self.block(blocks, tables, s, level, i + j,
                                                   plan.rows_written(level), j)
      state = lax.fori_loop(0, plan.runs_block(level, i).astype(jnp.int32), block, state)
    return state

  def block(self, blocks: blocks_lib.BlockConfig, tables: FlashTables, state: FlashState,
            level: int, end, out_len: int, trip=0) -> FlashState:
    """Adds the block of size 2^level whose inputs end at online position `end`.

    trip: the index (always 0) of the 0-or-1-trip loop that runs the block. A block as large
    as the ring reads the whole ring, whatever `end`; its window is scaled by (1 + trip) = 1 so
    that it still depends on the loop and XLA cannot hoist its transforms out of it (which would
    run them at every token)."""
    size = 1 << level
    ring, streams, batch, width = state.inputs.shape
    first, target = (end - size) % ring, end % ring
    group_streams, chunk = self.group_shape(size, streams, batch, width)
    per_stream = width // chunk
    groups = (streams // group_streams) * per_stream

    def add_group(g, outputs):
      s, c = (g // per_stream) * group_streams, (g % per_stream) * chunk
      window = lax.dynamic_slice(state.inputs, (first, s, 0, c),
                                 (size, group_streams, batch, chunk))
      if size == ring:
        window = window * jnp.asarray(1 + trip, window.dtype)
      # sliced from the whole table here: a slice taken outside a group loop would be a copy
      taps = lax.dynamic_slice(tables.taps, (0, s, c),
                               (min(2 * size, tables.taps.shape[0]), group_streams, chunk))
      spectra = {size: lax.dynamic_slice(tables.spectra[size], (s, c, 0),
                                         (group_streams, chunk, size + 1))
                 } if size in tables.spectra else {}
      contribution = blocks_lib.apply_block(blocks, window, taps, spectra, out_len)
      current = lax.dynamic_slice(outputs, (target, s, 0, c),
                                  (out_len, group_streams, batch, chunk))
      return lax.dynamic_update_slice(outputs, current + contribution, (target, s, 0, c))

    if groups == 1:
      return state._replace(outputs=add_group(0, state.outputs))
    return state._replace(outputs=lax.fori_loop(0, groups, add_group, state.outputs))

  def group_shape(self, size: int, streams: int, batch: int, width: int) -> tuple[int, int]:
    """(streams, channels) of one group of a block of `size`: everything when its input window
    fits in `group_bytes`, else one stream and the widest power-of-two share of D that fits."""
    group_bytes = self.options.group_bytes
    if size * streams * batch * width * 4 <= group_bytes:
      return streams, width
    chunk = width
    while chunk % 2 == 0 and size * batch * chunk * 4 > group_bytes:
      chunk //= 2
    return 1, chunk
