"""A mixing-only stack for benchmarks and tests: M layers of D channels, each a long causal
convolution with a per-channel skip term, with `tanh` between layers:

  x_0 = input;  y_l = conv(x_l, h_l) + skip_l * x_l;  x_{l+1} = tanh(y_l);  output = x_M.

Generation feeds each output back as the next input, so every position depends on the last.
It plugs into the engine like the language model (`online.py` interface), with vectors
instead of tokens, so the same strategies and schedule run on it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lcsm_jax import convolution
from lcsm_jax import engine
from lcsm_jax.engine import EngineOptions

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

  def init(self, key: Array, decay: float = 4.0) -> Params:
    """Random exponentially decaying filters (M, l_max, D) and skip terms (M, D), float32."""
    k_taps, k_rate, k_skip = jax.random.split(key, 3)
    shape = (self.num_layers, self.l_max, self.width)
    rates = decay * jax.random.uniform(k_rate, (self.num_layers, 1, self.width), minval=0.2)
    t = jnp.arange(self.l_max, dtype=jnp.float32)[None, :, None] / self.l_max
    taps = jax.random.normal(k_taps, shape) * jnp.exp(-rates * t) / jnp.sqrt(self.l_max / decay)
    skip = jax.random.normal(k_skip, (self.num_layers, self.width))
    return {"taps": taps.astype(jnp.float32), "skip": skip.astype(jnp.float32)}

  # -- the online-model interface --

  def filters(self, params: Params, length: int) -> tuple[Array, Array]:
    taps = jnp.swapaxes(params["taps"][:, :length], 0, 1)  # (T, M, D)
    return taps, taps[0] + params["skip"]

  def forward(self, params: Params, x: Array, conv=convolution.causal_conv_fft) -> Array:
    """The parallel forward: x (B, L, D) -> (B, L, D)."""
    for layer in range(self.num_layers):
      h = params["taps"][layer]
      x = jnp.tanh(conv(x, h).astype(jnp.float32) + params["skip"][layer] * x)
    return x

  def prefill(self, params: Params, x: Array) -> tuple[Array, Array, tuple]:
    inputs = []
    for layer in range(self.num_layers):
      inputs.append(x)
      x = jnp.tanh(convolution.causal_conv_fft(x, params["taps"][layer])
                   + params["skip"][layer] * x)
    return x, jnp.moveaxis(jnp.stack(inputs), 2, 0), ()  # inputs (P, M, B, D)

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


@functools.partial(jax.jit, static_argnames=("stack", "mixer", "num_steps"))
def _rollout(params, tables, constants, prompt, *, stack, mixer, num_steps):
  batch, length, width = prompt.shape
  prefill = stack.prefill(params, prompt)
  outputs = jnp.zeros((batch, length + num_steps, width), jnp.float32)
  outputs = lax.dynamic_update_slice_in_dim(outputs, prefill[0], 0, axis=1)

  def feed(outputs, r):  # the output of the previous position is the next input
    return lax.dynamic_index_in_dim(outputs, length + r - 1, axis=1, keepdims=False)

  def emit(outputs, r, out):
    return lax.dynamic_update_index_in_dim(outputs, out, length + r, axis=1)

  return engine.run(stack, mixer, params, tables, constants, prompt, prefill, num_steps, outputs,
                    feed, emit)


def prepare(params: Params, stack: ConvStack, strategy: str, num_steps: int, total: int,
            batch: int, options: EngineOptions | None = None):
  """(mixer, tables, step constants) for a rollout; compiled separately, outside the token loop."""
  options = options or EngineOptions()
  if total > stack.l_max:
    raise ValueError(f"length {total} exceeds the stack's l_max = {stack.l_max}.")
  mixer = engine.make_mixer(strategy, num_steps, stack.num_layers * batch * stack.width, options)
  tables, constants = engine.prepare_tables(params, online=stack, mixer=mixer, total=total)
  return mixer, tables, constants


def rollout(params: Params, stack: ConvStack, prompt: Array, num_steps: int, *,
            strategy: str = "flash", options: EngineOptions | None = None, **engine_options
            ) -> Array:
  """Runs the stack over `prompt` (B, P, D), P >= 1, then `num_steps` positions feeding each
  output back as the next input. Returns all outputs (B, P + num_steps, D)."""
  options = EngineOptions.create(options, **engine_options)
  prompt = jnp.asarray(prompt, jnp.float32)
  if prompt.ndim != 3 or prompt.shape[1] < 1 or prompt.shape[2] != stack.width:
    raise ValueError(f"prompt must have shape (batch, length >= 1, {stack.width}), "
                     f"got {prompt.shape}.")
  total = prompt.shape[1] + num_steps
  mixer, tables, constants = prepare(params, stack, strategy, num_steps, total, prompt.shape[0],
                                    options)
  return _rollout(params, tables, constants, prompt, stack=stack, mixer=mixer,
                  num_steps=num_steps)
