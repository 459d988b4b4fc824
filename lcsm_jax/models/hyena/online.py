"""The Hyena language model as the decoding engine drives it (`models.interface.LanguageModel`):
filters one layer at a time, a parallel prefill that keeps every long convolution's inputs, and
a one-token step.

S = n_layer x (order - 1) streams of D = d_model channels; the carry is every layer's
short-convolution window (n_layer, B, K - 1, (order + 1) D).

`step_weights='bfloat16'` runs the model whose dense kernels (in_proj, out_proj, fc1, fc2 of
every layer) are rounded to bfloat16: they are stored as bfloat16 for the step (cast once, in
`constants`) and each step's matmul reads them so, with float32 activations and accumulation
(`modules.step_dense`); carry and strategy state stay float32, and the prefill and parallel
forward use the same rounded kernels, so every strategy stays exact with respect to that
rounded model. Half the weight bytes per token where the backend has bfloat16 dots. XLA:CPU
has none (its dot would convert the kernels to float32 once, before the token loop, and read
float32 copies): on CPU the step's products are the custom call `cpu_kernels.bf16_matmul`,
built with the system C++ compiler on first use, which reads the kernels as bfloat16. Where it
cannot be built (no compiler, or a failed build: a warning names the reason) and on a device
mesh (XLA splits its dots over the mesh, not a custom call), the step keeps XLA's dot and its
float32 copies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from lcsm_jax import validation
from lcsm_jax.models.hyena import chunked_prefill
from lcsm_jax.models.hyena import params as params_lib
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.model import HyenaLM
from lcsm_jax.models.hyena.modules import HyenaBlock
from lcsm_jax.models.interface import BATCH, CHANNELS, Prefill

Array = jax.Array
Params = Any


# Prompts longer than this are prefilled in runs of this many positions (HyenaOnline.prefill_chunk).
PREFILL_CHUNK = 16384

# The dense layers whose kernels `step_weights` applies to: (module, submodule) in a block.
STEP_KERNELS = (("mixer", "in_proj"), ("mixer", "out_proj"), ("mlp", "fc1"), ("mlp", "fc2"))


def round_step_weights(blocks: Params, dtype: Any, restore: bool = False) -> Params:
  """`blocks` (a block's or the stacked blocks' parameter mapping) with the STEP_KERNELS
  kernels cast to `dtype` (restore: and back to their own dtype, i.e. rounded); everything
  else untouched. Returns plain dicts along the changed paths."""
  out = dict(blocks)
  for module, dense in STEP_KERNELS:
    out[module] = dict(out[module])
    out[module][dense] = dict(out[module][dense])
    kernel = out[module][dense]["kernel"]
    out[module][dense]["kernel"] = (kernel.astype(dtype).astype(kernel.dtype) if restore
                                    else kernel.astype(dtype))
  return out


class StepConstants(NamedTuple):
  """What the language model's step reads besides the embedding and head."""
  diagonal: Array             # (S, D): filter tap 0 plus skip term of every stream
  layers: tuple[Params, ...]  # per layer: the block's parameters without its filter tables


@dataclasses.dataclass(frozen=True)
class HyenaOnline:
  """The Hyena language model driven one token at a time.

  Attributes:
    config: the architecture.
    step_weights: 'float32' (default) or 'bfloat16' (also given as a dtype): the dtype in
      which the step reads the dense kernels (see the module docstring). With 'bfloat16' the
      model run is the one with those kernels rounded to bfloat16 (`model_params`), in the
      step, the prefill and the parallel forward alike.
    prefill_chunk: prompts longer than this many positions are prefilled in runs of this many
      positions (`chunked_prefill.prefill_in_chunks`: the pointwise parts of each layer a run
      at a time, the long convolutions over the whole prompt), which holds a few d_model-wide
      arrays per layer instead of all of them; None: always the parallel forward.
  """

  config: HyenaConfig
  step_weights: str = "float32"
  prefill_chunk: int | None = PREFILL_CHUNK

  def __post_init__(self):
    object.__setattr__(self, "step_weights", validation.check_step_weights(self.step_weights))
    chunk = self.prefill_chunk
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 1):
      raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {chunk!r}.")

  def model_params(self, params: Params) -> Params:
    """The parameters of the model this adapter runs: `params` itself for float32 step
    weights; for bfloat16, the STEP_KERNELS kernels rounded to bfloat16 and back to their
    dtype (the model the bfloat16 step computes exactly)."""
    if self.step_weights == "float32":
      return params
    rounded = round_step_weights(self._blocks(params), self.step_weights, restore=True)
    stack = {**params["params"]["stack"], "blocks": rounded}
    return {**params, "params": {**params["params"], "stack": stack}}

  @property
  def num_streams(self) -> int:
    return self.config.num_streams

  @property
  def width(self) -> int:
    return self.config.d_model

  @property
  def max_length(self) -> int:
    return self.config.l_max

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def padded_vocab_size(self) -> int:
    return self.config.padded_vocab_size

  def check_params(self, params: Params) -> None:
    params_lib.check_params_match(self.config, params)

  def param_partition(self, params: Params) -> Params:
    """Logical PartitionSpecs of `params` (same pytree): the d_model axis of every parameter
    on CHANNELS (the embedding's columns, LayerNorms, the input axis of in_proj, out_proj and
    fc1, the output axis of fc2, the implicit filter's output layer); the (order + 1) D axes
    of in_proj's output and the short convolution, and the filter MLP's hidden layers, are
    replicated (small, or split into chunks of D that a contiguous split would cut across)."""
    channel_axis = {
        ("embedder", "embedding"): 1, ("ln_f", "scale"): 0, ("ln_f", "bias"): 0,
        ("norm1", "scale"): 1, ("norm1", "bias"): 1, ("norm2", "scale"): 1,
        ("norm2", "bias"): 1, ("in_proj", "kernel"): 1, ("out_proj", "kernel"): 1,
        ("fc1", "kernel"): 1, ("fc2", "kernel"): 2, ("fc2", "bias"): 1,
        ("output", "kernel"): 2, ("filter", "bias"): 1, ("filter", "deltas"): 1,
    }

    def spec(path, x):
      keys = tuple(getattr(k, "key", str(k)) for k in path)
      axis = channel_axis.get(keys[-2:])
      if axis is None or axis >= x.ndim:
        return PartitionSpec()
      return PartitionSpec(*(CHANNELS if i == axis else None for i in range(x.ndim)))

    return jax.tree_util.tree_map_with_path(spec, params)

  def carry_partition(self, carry: Array) -> PartitionSpec:
    """The short-convolution windows (n_layer, B, K - 1, (order + 1) D): rows on BATCH."""
    return PartitionSpec(None, BATCH)

  def _blocks(self, params: Params) -> Params:
    return params["params"]["stack"]["blocks"]

  def filters(self, params: Params, length: int) -> tuple[Array, Array]:
    """One layer at a time, written in place into the (T, S, D) table: the implicit filter's
    temporaries at T = 2^20 are several times the table, so computing all layers at once would
    need several times the memory of the filters themselves."""
    cfg = self.config
    block = HyenaBlock(cfg)
    blocks = self._blocks(params)
    per_layer = cfg.num_streams // cfg.n_layer

    def one_layer(layer, carry):
      taps, diagonal = carry
      p = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, layer, keepdims=False), blocks)
      h, skip = block.apply({"params": p}, length, method=HyenaBlock.filters)  # (T, N-1, D)
      taps = lax.dynamic_update_slice(taps, h.astype(jnp.float32)[:, None], (0, layer, 0, 0))
      diagonal = lax.dynamic_update_index_in_dim(diagonal, (h[0] + skip).astype(jnp.float32),
                                                 layer, axis=0)
      return taps, diagonal

    taps = jnp.zeros((length, cfg.n_layer, per_layer, cfg.d_model), jnp.float32)
    diagonal = jnp.zeros((cfg.n_layer, per_layer, cfg.d_model), jnp.float32)
    taps, diagonal = lax.fori_loop(0, cfg.n_layer, one_layer, (taps, diagonal))
    return (taps.reshape(length, cfg.num_streams, cfg.d_model),
            diagonal.reshape(cfg.num_streams, cfg.d_model))

  def _lm(self, conv) -> HyenaLM:
    return HyenaLM(self.config) if conv is None else HyenaLM(self.config, long_conv=conv)

  def forward(self, params: Params, tokens: Array, taps: Array | None = None,
              conv=None) -> Array:
    """tokens (B, L) -> logits (B, L, padded_vocab); taps: see `HyenaLM.__call__`; conv: the
    long convolution (None: the FFT one; see `HyenaLM.long_conv`)."""
    return self._lm(conv).apply(self.model_params(params), tokens, taps=taps)

  def prefill(self, params: Params, prompt: Array, taps: Array | None = None,
              conv=None) -> Prefill:
    """prompt (B, P) -> logits (B, P, V), prompt inputs (P, S, B, D), short-conv windows."""
    cfg = self.config
    if self.prefill_chunk is not None and prompt.shape[1] > self.prefill_chunk:
      return chunked_prefill.prefill_in_chunks(cfg, self.model_params(params), prompt,
                                               self.prefill_chunk, taps, conv)
    logits, cache = self._lm(conv).apply(self.model_params(params), prompt,
                                         collect_cache=True, taps=taps)
    inputs = cache.conv_inputs  # (layers, N - 1, B, P, D)
    length = prompt.shape[1]
    inputs = jnp.moveaxis(inputs, 3, 0).reshape(length, cfg.num_streams, prompt.shape[0],
                                                 cfg.d_model)
    return Prefill(logits, inputs, cache.history)

  def initial_carry(self, params: Params, batch: int) -> Array:
    cfg = self.config
    return jnp.zeros((cfg.n_layer, batch, cfg.short_filter_order - 1,
                      (cfg.order + 1) * cfg.d_model), jnp.float32)

  def constants(self, params: Params, diagonal: Array) -> StepConstants:
    """The diagonal and every layer's step weights as separate arrays (no filter tables).

    Slicing the stacked (n_layer, ...) weights inside the token loop made XLA copy every
    layer's weights at every token (25 MB per token for d_model 256, 8 layers); slices taken
    here, in a program of their own, are made once. With bfloat16 `step_weights` the dense
    kernels are cast here too, once, and stored as bfloat16: the token loop reads them so.
    """
    blocks = dict(self._blocks(params))
    blocks["mixer"] = {k: v for k, v in blocks["mixer"].items() if k != "filter"}
    if self.step_weights != "float32":
      blocks = round_step_weights(blocks, self.step_weights)
    layers = tuple(jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(self.config.n_layer))
    return StepConstants(diagonal, layers)

  def step(self, params: Params, constants: StepConstants, carry: Array, token: Array,
           pending: Array) -> tuple[Array, Array, Array]:
    """token (B,) -> (windows, inputs (S, B, D), logits (B, V))."""
    cfg = self.config
    model, block = HyenaLM(cfg), HyenaBlock(cfg)
    x = model.apply(params, token, method=HyenaLM.embed)
    per_layer = (cfg.n_layer, cfg.num_convolutions)
    pending = pending.reshape(per_layer + pending.shape[1:])
    diagonal = constants.diagonal.reshape(per_layer + constants.diagonal.shape[1:])
    inputs, windows = [], []
    for layer in range(cfg.n_layer):
      x, layer_inputs, window = block.apply(
          {"params": constants.layers[layer]}, x, pending[layer], carry[layer], diagonal[layer],
          method=HyenaBlock.step)
      inputs.append(layer_inputs)
      windows.append(window)
    logits = model.apply(params, x, method=HyenaLM.head)
    inputs = jnp.stack(inputs)  # (n_layer, N - 1, B, D)
    return jnp.stack(windows), inputs.reshape((cfg.num_streams,) + inputs.shape[2:]), logits
