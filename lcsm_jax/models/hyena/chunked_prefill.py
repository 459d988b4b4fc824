"""The Hyena language model's prefill for long prompts, in runs of positions.

The parallel forward (`HyenaLM.__call__`) holds every activation of a layer at once: at
P = 2^20 positions and d_model 256 that is several GiB per d_model-wide array (the
in-projection's (order + 1) D outputs, the MLP's d_inner hidden units): XLA estimated 26.4
GiB for lazy's prefill of 2^20 - 64 positions of the 256/8/1024 model (12.5 GiB in runs, 8
of it the state). Only the long convolutions need the whole length; every
other part of a block is pointwise in the positions, or (the short convolution) looks K - 1
positions back. `prefill_in_chunks` therefore runs each layer as

  A. the in-projection and short convolution, `chunk` positions at a time (the short
     convolution's window carried from run to run): the first convolution's input, also
     written run by run into the (P, S, B, D) buffer the decoding state keeps, and the gates
     the later ones need (none at order 2), (B, P, D) each;
  B. the long convolutions over the whole length (`convolution.convolve`: the FFT one reads
     the layer's filter from `taps` and writes its result over its input a channel group at
     a time), writing each later one's input into the state's buffer;
  C. the output gate (gates[0], made again from the run's stream, which costs one more
     in-projection per layer and saves keeping it), the out-projection, residual and MLP,
     `chunk` positions at a time, in place in the residual stream;

and the head `chunk` positions at a time. The layers run in a `fori_loop` (one traced), so
per layer it holds the residual stream, order - 2 gates and one convolution's input and
output: about (order + 1) x B x P x D floats beside the state, the logits and the long
convolution's channel groups. Results equal the parallel forward's to float32 rounding (the
same operations on fewer rows at a time).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax import convolution
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.modules import HyenaBlock, long_convolve
from lcsm_jax.models.interface import Prefill

Array = jax.Array
Params = Any


def for_each_run(length: int, chunk: int, body: Callable[[Any, int, Any], Any], carry: Any
                 ) -> Any:
  """carry = body(start, size, carry) over the runs [start, start + size) that cover
  [0, length) in order: the runs of `chunk` positions in a `fori_loop` (start traced), then the
  shorter last run, if any (start and size static)."""
  full = length // chunk
  if full:
    carry = lax.fori_loop(0, full, lambda i, c: body(i * chunk, chunk, c), carry)
  if length % chunk:
    carry = body(full * chunk, length % chunk, carry)
  return carry


def _run(x: Array, start, size: int) -> Array:
  return lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put(x: Array, run: Array, start) -> Array:
  return lax.dynamic_update_slice_in_dim(x, run.astype(x.dtype), start, axis=1)


def prefill_in_chunks(config: HyenaConfig, params: Params, prompt: Array, chunk: int,
                      taps: Array | None = None, conv: Callable | str | None = None,
                      dtype: Any = jnp.float32) -> Prefill:
  """The prefill of `prompt` (B, P) in runs of `chunk` positions (see the module docstring).

  Args:
    config: the architecture; params: the model's parameters (`HyenaLM.init`).
    chunk: positions per run of the pointwise parts, >= 1.
    taps: None (the implicit filters), or long filters (>= P, S, D) as in `HyenaLM.__call__`.
    conv: the long convolution (None: the FFT one; see `HyenaLM.long_conv`).
    dtype: the modules' compute and parameter dtype (`HyenaLM(dtype=, param_dtype=)`).
  Returns:
    `Prefill`: logits (B, P, padded_vocab), the long convolutions' inputs (P, S, B, D), every
    layer's short-convolution window (n_layer, B, K - 1, (order + 1) D); float32 (float64
    for a float64 model).
  """
  cfg = config
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}.")
  batch, length = prompt.shape
  if length > cfg.l_max:
    raise ValueError(f"sequence length {length} exceeds the model's l_max = {cfg.l_max}.")
  model = HyenaLM(cfg, dtype=dtype, param_dtype=dtype)
  block = HyenaBlock(cfg, dtype=dtype, param_dtype=dtype)
  long_conv = convolution.long_convolution("fft" if conv is None else conv)
  blocks = params["params"]["stack"]["blocks"]
  convs = cfg.order - 1                   # long convolutions per layer (N - 1)
  streams, width = cfg.num_streams, cfg.d_model
  x = model.apply(params, prompt, method=HyenaLM.embed)                     # (B, P, D)
  f32 = jnp.promote_types(dtype, jnp.float32)  # the buffers' dtype

  def layer(index, carry):
    x, inputs, windows = carry
    p = {"params": jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False),
                                blocks)}

    def project(start, size, carry):  # A
      middle_gates, first, inputs, window = carry
      gates, v, window = block.apply(p, _run(x, start, size), window, method=HyenaBlock.project)
      if convs > 1:
        middle_gates = lax.dynamic_update_slice_in_dim(
            middle_gates, jnp.stack(gates[1:convs]).astype(f32), start, axis=2)
      run = (v * gates[convs]).astype(f32)
      inputs = lax.dynamic_update_slice(  # the first convolution's input, straight to the state
          inputs, jnp.moveaxis(run, 1, 0)[:, None], (start, index * convs, 0, 0))
      return middle_gates, _put(first, run, start), inputs, window

    window0 = jnp.zeros((batch, cfg.short_filter_order - 1, (cfg.order + 1) * width), f32)
    middle_gates, a, inputs, window = for_each_run(
        length, chunk, project,
        (jnp.zeros((convs - 1, batch, length, width), f32), jnp.zeros(x.shape, f32), inputs,
         window0))

    h, skip = block.apply(p, length, method=HyenaBlock.filters)             # B
    first_stream = 0
    if taps is not None:  # the layer's filters read in place (a slice would copy P x D each)
      h, first_stream = taps, index * convs
    for o in range(convs):
      if o:
        inputs = lax.dynamic_update_slice(
            inputs, jnp.moveaxis(a, 1, 0)[:, None].astype(f32), (0, index * convs + o, 0, 0))
      a = long_convolve(long_conv, a, h, skip[o], f32, stream=first_stream + o)
      if o < convs - 1:                     # the next input; the last output waits for gates[0]
        a = a * middle_gates[convs - 2 - o]

    def finish(start, size, carry):  # C: gates[0] made again from the run's old stream
      x, window = carry
      gates, _, window = block.apply(p, _run(x, start, size), window,
                                     method=HyenaBlock.project)
      y = block.apply(p, _run(a, start, size) * gates[0], method=HyenaBlock.output)
      return _put(x, block.apply(p, _run(x, start, size), y, method=HyenaBlock.finish),
                  start), window

    x, _ = for_each_run(length, chunk, finish, (x, window0))
    windows = lax.dynamic_update_index_in_dim(windows, window.astype(windows.dtype), index, 0)
    return x, inputs, windows

  inputs = jnp.zeros((length, streams, batch, width), f32)
  windows = jnp.zeros((cfg.n_layer, batch, cfg.short_filter_order - 1,
                       (cfg.order + 1) * width), f32)
  x, inputs, windows = lax.fori_loop(0, cfg.n_layer, layer, (x, inputs, windows))

  def head(start, size, logits):
    return _put(logits, model.apply(params, _run(x, start, size), method=HyenaLM.head), start)

  logits = for_each_run(length, chunk, head,
                        jnp.zeros((batch, length, cfg.padded_vocab_size), f32))
  return Prefill(logits, inputs, windows)
