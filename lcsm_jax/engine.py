"""The generation engine, independent of the model: strategy selection, filter tables, and the
token loops. Models plug in through the online-model interface of `online.py`; what is fed at
each position and what is kept from each output are plug-ins too (`feed`, `emit`), so the same
loop serves sampling, teacher forcing and the synthetic benchmark stack.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax import blocks as blocks_lib
from lcsm_jax import mixing
from lcsm_jax import schedule

Array = jax.Array
Params = Any
IO = Any
Feed = Callable[[IO, Array], Array]            # (io, r) -> model input at online position r
Emit = Callable[[IO, Array, Array], IO]        # (io, r, output) -> io

STRATEGIES = ("flash", "lazy", "eager", "recompute")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Choices of the exact engine that do not change its results.

  Attributes:
    tau: flash block implementation: 'auto' (direct up to the crossover measured on this
      machine, FFT above), 'direct', 'fft', 'pallas', an int crossover (direct for block sizes
      <= tau) or a mapping {block size: method}.
    layer_parallel: flash runs the blocks of all layers as one batched call (False: one call
      per stream, for ablation).
    precomputed_spectra: flash FFT blocks use filter spectra computed once per model (False:
      transform the filter slice in every block, for ablation).
    spectra_max_size: spectra are precomputed up to this block size (None: all). The few
      larger blocks of a long generation transform their filter slice themselves, which keeps
      the tables near the size of the filters (all sizes would cost twice the filters' bytes).
    group_bytes: flash blocks whose input window exceeds this many bytes run in groups of one
      stream and part of the channels, bounding their FFT temporaries.
    chunk: positions per inner iteration of the lazy and eager strategies (a power of two).
    check_memory: estimate a run's memory (XLA's analysis of the compiled programs, plus
      parameters and tables) before it starts and refuse it with a ValueError naming the
      estimate when it exceeds the device's (on CPU, the host's) available memory.
  """

  tau: str | int | Mapping[int, str] = "auto"
  layer_parallel: bool = True
  precomputed_spectra: bool = True
  spectra_max_size: int | None = 1 << 15
  group_bytes: int = mixing.GROUP_BYTES
  chunk: int = 256
  check_memory: bool = True

  def __post_init__(self):
    for name in ("chunk", "group_bytes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if self.chunk < 1 or self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk must be a power of two >= 1, got {self.chunk}.")
    if self.spectra_max_size is not None and self.spectra_max_size < 1:
      raise ValueError(f"spectra_max_size must be >= 1 or None, got {self.spectra_max_size}.")
    if self.group_bytes < 0:
      raise ValueError(f"group_bytes must be >= 0, got {self.group_bytes}.")

  @classmethod
  def create(cls, options: "EngineOptions | None" = None, **overrides) -> "EngineOptions":
    """`options` with keyword overrides; unknown names raise a TypeError listing valid ones."""
    options = options or cls()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
      raise TypeError(f"unknown engine option(s) {unknown}; EngineOptions has {names}.")
    return dataclasses.replace(options, **overrides) if overrides else options


def make_mixer(strategy: str, num_steps: int, channels: int, options: EngineOptions):
  """The mixing strategy for `strategy` (None for 'recompute', which keeps no mixing state).

  channels: S * B * D, the width of one block (used by tau='auto').
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
  if strategy == "recompute":
    return None
  if strategy == "lazy":
    return mixing.Lazy(options.chunk)
  if strategy == "eager":
    return mixing.Eager(options.chunk)
  tau = options.tau
  tau = tuple(sorted(tau.items())) if isinstance(tau, Mapping) else tau
  blocks = _block_config(tuple(schedule.block_sizes(num_steps)), tau, channels,
                         options.layer_parallel, options.precomputed_spectra,
                         options.spectra_max_size)
  return mixing.Flash(blocks, options.group_bytes)


@functools.lru_cache(maxsize=256)
def _block_config(sizes, tau, channels, layer_parallel, precomputed_spectra, spectra_max_size):
  # measures only for tau='auto' when nothing is cached
  from lcsm_jax.tuning import crossover as crossover_lib
  tau = dict(tau) if isinstance(tau, tuple) else tau
  return blocks_lib.block_config(
      sizes, tau, crossover=lambda: crossover_lib.crossover(channels, max(sizes, default=1)),
      pallas_crossover=crossover_lib.pallas_crossover,
      layer_parallel=layer_parallel, precomputed_spectra=precomputed_spectra,
      spectra_max_size=spectra_max_size)


@functools.partial(jax.jit, static_argnames=("online", "mixer", "total"))
def prepare_tables(params: Params, *, online, mixer, total: int):
  """Filters of `total` taps, and the strategy's tables: computed once, outside the loop.

  Returns:
    (tables or None for 'recompute', the step's constants: `online.constants(params,
    diagonal)`, e.g. the diagonal (S, D) and per-layer parameters, as separate buffers so that
    the token loop never slices stacked weights).
  """
  taps, diagonal = online.filters(params, total)
  return (mixer.prepare(taps) if mixer is not None else None), online.constants(params, diagonal)


def run_online(online, mixer, params: Params, tables, constants, prefill, num_steps: int,
               io: IO, feed: Feed, emit: Emit, batch: int) -> IO:
  """The token loop of every strategy that keeps mixing state (all but 'recompute').

  Args:
    prefill: `online.prefill(params, prompt)` or None for an empty prompt.
    num_steps: M online positions; step r feeds `feed(io, r)` at absolute position P + r and
      hands the model's output to `emit(io, r, output)`.
  """
  if prefill is None:
    prompt_inputs = jnp.zeros((0, online.num_streams, batch, online.width), jnp.float32)
    carry = online.initial_carry(params, batch)
  else:
    _, prompt_inputs, carry = prefill
  state = mixer.init(tables, prompt_inputs, num_steps)

  def step(rest, pending, r):
    carry, io, x = rest  # x: the input at r, read at the end of the previous iteration
    carry, inputs, output = online.step(params, constants, carry, x, pending)
    io = emit(io, r, output)
    return (carry, io, feed(io, r + 1)), inputs

  _, (_, io, _) = mixer.run(tables, step, state, (carry, io, feed(io, 0)), num_steps)
  return io


def run_recompute(online, params: Params, inputs: Array, start: int, num_steps: int, io: IO,
                  feed: Feed, emit: Emit) -> IO:
  """'recompute': the parallel forward over the whole prefix for every position.

  Args:
    inputs: (B, T, ...) buffer holding the prompt in [0, start); step r writes `feed(io, r)` at
      start + r. The prefix is padded up to a power-of-two bucket, so the cost follows the
      prefix length as in the reference implementation.
  """
  total = inputs.shape[1]
  buckets = sorted({min(1 << k, total) for k in range(total.bit_length() + 1)})

  def forward(length):
    def run(inputs, t):
      outputs = online.forward(params, inputs[:, :length])
      return lax.dynamic_index_in_dim(outputs, t, axis=1, keepdims=False)
    return run

  branches = [forward(length) for length in buckets]
  bucket_ends = jnp.asarray(buckets, jnp.int32)

  def body(r, carry):
    inputs, io = carry
    t = start + r
    inputs = lax.dynamic_update_index_in_dim(inputs, feed(io, r), t, axis=1)
    output = lax.switch(jnp.searchsorted(bucket_ends, t + 1), branches, inputs, t)
    return inputs, emit(io, r, output)

  _, io = lax.fori_loop(0, num_steps, body, (inputs, io))
  return io


def run(online, mixer, params: Params, tables, constants, prompt: Array, prefill,
        num_steps: int, io: IO, feed: Feed, emit: Emit) -> IO:
  """Runs `num_steps` online positions after `prompt` (B, P, ...) with any strategy."""
  batch, length = prompt.shape[:2]
  if mixer is None:
    buffer = jnp.zeros((batch, length + num_steps) + prompt.shape[2:], prompt.dtype)
    buffer = lax.dynamic_update_slice_in_dim(buffer, prompt, 0, axis=1)
    return run_recompute(online, params, buffer, length, num_steps, io, feed, emit)
  return run_online(online, mixer, params, tables, constants, prefill, num_steps, io, feed, emit,
                    batch)
