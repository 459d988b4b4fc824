"""What a model family implements so that the decoding engine can drive it: `OnlineModel`.

An online model exposes its long convolutions as S "streams" of D channels (for Hyena: layers x
convolutions per layer) and leaves their mixing to a decoding strategy. It provides a parallel
forward, a prefill that also returns each stream's inputs, and a one-position step that takes
each stream's pending output (the contribution of all earlier positions, computed by the
strategy) and returns the stream's input at this position. Everything that grows with the
sequence lives in the strategy's state; the model keeps only a small `carry` (e.g. the
short-convolution windows).

Shapes: B batch rows, P prompt positions, S streams, D channels, T positions in all.

On a device mesh (`decoding.sharding`), a model family may say which axes of its parameters and
carry hold channels or batch rows: `param_partition(params)` and `carry_partition(carry)`
return pytrees (prefixes of the arrays') of logical `PartitionSpec`s whose entries are BATCH,
CHANNELS or None. Both are optional: without them, parameters and carry are replicated.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax

Array = jax.Array
Params = Any     # a model's parameter pytree
Carry = Any      # a model's own per-sequence state besides the long convolutions
Constants = Any  # what the step reads besides `params`, computed once outside the token loop

BATCH = "batch"        # logical partition name: an axis of batch rows
CHANNELS = "channels"  # logical partition name: an axis of channels (split over a mesh's model axis)


class Prefill(NamedTuple):
  """What a parallel pass over a prompt leaves for generation to continue from."""
  outputs: Array      # (B, P, ...) the model's outputs at every prompt position
  conv_inputs: Array  # (P, S, B, D) every long convolution's inputs
  carry: Carry


@runtime_checkable
class OnlineModel(Protocol):
  """A long-convolution model driven one position at a time (see the module docstring)."""

  @property
  def num_streams(self) -> int:
    """S: long convolutions in the whole model."""

  @property
  def width(self) -> int:
    """D: channels of every long convolution."""

  @property
  def max_length(self) -> int:
    """The longest sequence the model accepts (its filters' length)."""

  def filters(self, params: Params, length: int) -> tuple[Array, Array]:
    """(taps (length, S, D), diagonal (S, D) = tap 0 plus the skip term), float32."""

  def constants(self, params: Params, diagonal: Array) -> Constants:
    """What `step` reads besides `params` (e.g. per-layer weights unstacked)."""

  def forward(self, params: Params, inputs: Array, taps: Array | None = None,
              conv: Callable | None = None) -> Array:
    """The parallel forward: inputs (B, L, ...) -> outputs (B, L, ...). taps: None, or long
    filters (>= L, S, D) to use instead of the model's own (tap 0 included; skip terms stay
    the model's), e.g. distilled ones. conv: None (the model's FFT convolution), or the
    causal convolution (u (B, L, D), h (>= L, D)) -> (B, L, D) to use for every long
    convolution (on a mesh, the engine passes one that runs on each device's shards)."""

  def prefill(self, params: Params, inputs: Array, taps: Array | None = None,
              conv: Callable | None = None) -> Prefill:
    """The parallel forward over a prompt (B, P, ...), P >= 1, and what it leaves behind
    (taps and conv as in `forward`)."""

  def initial_carry(self, params: Params, batch: int) -> Carry:
    """The carry before any position (an empty prompt)."""

  def step(self, params: Params, constants: Constants, carry: Carry, x: Array,
           pending: Array) -> tuple[Carry, Array, Array]:
    """One position: input x (B, ...) and pending outputs (S, B, D) ->
    (carry, this position's long-convolution inputs (S, B, D), output (B, ...))."""

  # Optional (see the module docstring):
  # def param_partition(self, params: Params) -> Any: logical PartitionSpecs of the parameters
  # def carry_partition(self, carry: Carry) -> Any: logical PartitionSpecs of the carry
  # def without_filters(self, params: Params) -> Params: the parameters `prefill` (given
  #   taps) and `step` read, without those only `filters` reads; a session whose strategy
  #   supplies the filters keeps only these once its tables exist (worth it where the
  #   filters' parameters are large, e.g. explicit taps)


@runtime_checkable
class LanguageModel(OnlineModel, Protocol):
  """An online model over token ids whose outputs are logits (what `Decoder` samples from)."""

  @property
  def vocab_size(self) -> int:
    """Real tokens: ids in [0, vocab_size); logits may be padded beyond it."""

  @property
  def padded_vocab_size(self) -> int:
    """Width of the logits."""

  def check_params(self, params: Params) -> None:
    """Raises a ValueError naming every parameter that does not fit the model."""
