"""A mixing-only stack for benchmarks and tests: M layers of D channels, each a long causal
convolution with a per-channel skip term, with `tanh` between layers:

  x_0 = input;  y_l = conv(x_l, h_l) + skip_l * x_l;  x_{l+1} = tanh(y_l);  output = x_M.

It implements the online-model interface (`models.interface.OnlineModel`) over vectors instead
of tokens; `decoding.Rollout` feeds each output back as the next input, so every position
depends on the last and the same strategies and schedule run on it as on the language model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lcsm_jax import convolution
from lcsm_jax.models.interface import CHANNELS, Prefill

Array = jax.Array
Params = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class ConvStack:
  """Attributes: num_layers M, width D, l_max (filter taps kept)."""

  num_layers: int
  width: int
  l_max: int

  @property
  def num_streams(self) -> int:
    return self.num_layers

  @property
  def max_length(self) -> int:
    return self.l_max

  def init(self, key: Array, decay: float = 4.0) -> Params:
    """Random exponentially decaying filters (M, l_max, D) and skip terms (M, D), float32.
    One compiled program drawing one layer at a time, so that the random bits' temporaries
    stay one layer's (drawn at once, 2^20 taps of 8 x 256 channels needed a 24 GiB buffer)."""
    return _init_stack(self, key, decay)

  def _init(self, key: Array, decay: float) -> Params:
    k_taps, k_rate, k_skip = jax.random.split(key, 3)
    rates = decay * jax.random.uniform(k_rate, (self.num_layers, 1, self.width), minval=0.2)
    t = jnp.arange(self.l_max, dtype=jnp.float32)[:, None] / self.l_max

    def layer(args):  # (l_max, D)
      k, rate = args
      return (jax.random.normal(k, (self.l_max, self.width)) * jnp.exp(-rate * t)
              / jnp.sqrt(self.l_max / decay))

    taps = jax.lax.map(layer, (jax.random.split(k_taps, self.num_layers), rates))
    skip = jax.random.normal(k_skip, (self.num_layers, self.width))
    return {"taps": taps.astype(jnp.float32), "skip": skip.astype(jnp.float32)}

  def param_partition(self, params: Params) -> dict[str, PartitionSpec]:
    """Taps (M, l_max, D) and skip terms (M, D): channels on CHANNELS."""
    specs = {"taps": PartitionSpec(None, None, CHANNELS), "skip": PartitionSpec(None, CHANNELS)}
    return {name: specs[name] for name in params}

  def without_filters(self, params: Params) -> Params:
    """The parameters without the taps, for a session whose strategy's tables hold them
    (`decoding.session.Session` drops them once the tables exist: the taps are the stack's
    parameters, and the tables' copy would double their bytes)."""
    return {"skip": params["skip"]}

  def carry_partition(self, carry: tuple) -> tuple:
    return ()

  def filters(self, params: Params, length: int) -> tuple[Array, Array]:
    taps = jnp.swapaxes(params["taps"][:, :length], 0, 1)  # (T, M, D)
    return taps, taps[0] + params["skip"]

  def _layers(self, params: Params, x: Array, conv, taps: Array | None,
              inputs: Array | None = None) -> tuple[Array, Array | None]:
    """The parallel forward's output, and, given a (P, M, B, D) buffer `inputs`, that buffer
    with every layer's convolution input written in. The layers are a loop, so that a layer's
    input is written into the buffer (in place) before the next layer runs: unrolled, XLA
    kept every layer's input until the end (8 GiB beside the buffer's 8 at 2^20 x 8 x 256)."""
    x = x.astype(jnp.float32)

    def layer_step(layer, carry):
      x, inputs = carry
      if inputs is not None:
        inputs = jax.lax.dynamic_update_index_in_dim(inputs, jnp.moveaxis(x, 1, 0), layer, 1)
      h = (jax.lax.dynamic_index_in_dim(params["taps"], layer, 0, keepdims=False)
           if taps is None else jax.lax.dynamic_index_in_dim(taps, layer, 1, keepdims=False))
      skip = jax.lax.dynamic_index_in_dim(params["skip"], layer, 0, keepdims=False)
      return jnp.tanh(conv(x, h).astype(jnp.float32) + skip * x), inputs

    return jax.lax.fori_loop(0, self.num_layers, layer_step, (x, inputs))

  def forward(self, params: Params, x: Array, taps: Array | None = None, conv=None) -> Array:
    """The parallel forward: x (B, L, D) -> (B, L, D); taps: None, or filters (>= L, M, D) to
    use instead of the parameters'(the skip terms stay); conv: the causal convolution
    (u (B, L, D), h (>= L, D)) -> (B, L, D) (None: `convolution.causal_conv_fft`)."""
    return self._layers(params, x, conv or convolution.causal_conv_fft, taps)[0]

  def prefill(self, params: Params, x: Array, taps: Array | None = None, conv=None) -> Prefill:
    inputs = jnp.zeros((x.shape[1], self.num_layers) + x.shape[:1] + x.shape[2:], jnp.float32)
    x, inputs = self._layers(params, x, conv or convolution.causal_conv_fft, taps, inputs)
    return Prefill(x, inputs, ())  # inputs (P, M, B, D)

  def constants(self, params: Params, diagonal: Array) -> Array:
    return diagonal

  def initial_carry(self, params: Params, batch: int) -> tuple:
    return ()

  def step(self, params: Params, diagonal: Array, carry: tuple, x: Array, pending: Array):
    inputs = []
    for layer in range(self.num_layers):
      inputs.append(x)
      x = jnp.tanh(pending[layer] + x * diagonal[layer])
    return carry, jnp.stack(inputs), x


_init_stack = jax.jit(lambda stack, key, decay: stack._init(key, decay),  # pylint: disable=protected-access
                      static_argnums=0)
