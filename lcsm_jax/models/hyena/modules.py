"""Flax (linen) modules of the Hyena layer, in the exact order of the HyenaDNA reference.

Shapes: B batch, L sequence length, D = `d_model`, N = Hyena order, K = short filter width.
Every module is pure: `init` creates parameters, `apply` reads them; nothing else is stored.
Each block has a parallel `__call__` (training, prefill) and a one-position `step` that the
generation engine drives, with the long convolutions replaced by their pending outputs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import cpu_kernels
from lcsm_jax import convolution
from lcsm_jax.models.hyena.config import HyenaConfig

Array = jax.Array
DType = Any


def positional_table(l_max: int, emb_dim: int) -> tuple[Array, Array]:
  """The filter MLP's input features: time in [0, 1] and complex-exponential bands.

  Returns:
    z: `(l_max, emb_dim)` = [t, cos bands, -sin bands]; t: `(l_max, 1)` time grid in [0, 1].
  """
  t = jnp.linspace(0.0, 1.0, l_max)[:, None]
  bands = (emb_dim - 1) // 2
  w = 2 * math.pi * jnp.linspace(0.0, l_max - 1, l_max)[:, None] / l_max
  f = jnp.linspace(1e-4, bands - 1, bands)[None, :]
  z = jnp.concatenate([t, jnp.cos(f * w), -jnp.sin(f * w)], axis=-1)
  return z, t


class ImplicitFilter(nn.Module):
  """Hyena's implicit long filter: an MLP with `Sin` activations over positional features,
  multiplied by a per-channel exponential decay; plus the per-channel skip term `bias` (D).

  The filter for length L is the first L rows of the table, so filters are prefix-consistent.
  """

  features: int
  l_max: int
  emb_dim: int = 5
  width: int = 64
  num_inner_mlps: int = 2
  activation_freq: float = 10.0
  modulate: bool = True
  modulation_shift: float = 0.05
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  decay_target: float = 1e-2
  param_dtype: DType = jnp.float32

  def setup(self):
    self.z = self.param("z", lambda _: positional_table(self.l_max, self.emb_dim)[0])
    self.t = self.param("t", lambda _: positional_table(self.l_max, self.emb_dim)[1])
    # One frequency vector shared by every Sin activation, as in the reference.
    self.freq = self.param("freq", nn.initializers.constant(self.activation_freq),
                           (self.width,), self.param_dtype)
    self.hidden = [nn.Dense(self.width, param_dtype=self.param_dtype, name=f"dense_{i}")
                   for i in range(self.num_inner_mlps + 1)]
    self.output = nn.Dense(self.features, use_bias=False, param_dtype=self.param_dtype,
                           name="output")
    max_decay = math.log(self.decay_target) / self.fast_decay_pct
    min_decay = math.log(self.decay_target) / self.slow_decay_pct
    self.deltas = self.param(
        "deltas", lambda _: jnp.linspace(min_decay, max_decay, self.features, dtype=self.param_dtype))
    self.bias = self.param("bias", nn.initializers.normal(1.0), (self.features,),
                           self.param_dtype)

  def __call__(self, length: int) -> Array:
    """Filter taps `(length, features)` in float32 (float64 when the parameters are)."""
    if length > self.l_max:
      raise ValueError(f"filter length {length} exceeds the model's l_max = {self.l_max}.")
    dtype = jnp.promote_types(self.freq.dtype, jnp.float32)
    h = self.z[:length].astype(dtype)
    freq = self.freq.astype(dtype)
    for dense in self.hidden:
      h = jnp.sin(freq * dense(h))
    h = self.output(h)
    if self.modulate:
      decay = jnp.exp(-self.t[:length].astype(dtype) * jnp.abs(self.deltas.astype(dtype)))
      h = h * (decay + self.modulation_shift)
    return h

  def skip(self) -> Array:
    """The per-channel skip term `(features,)`: `y = h * u + bias * u`."""
    return self.bias


class ShortConv(nn.Module):
  """Depthwise causal convolution of width K over time (the reference's `short_filter`)."""

  features: int
  width: int = 3
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, history: Array | None = None) -> tuple[Array, Array]:
    """Convolves `x` (B, L, C), continuing from `history` (B, K - 1, C) (zeros if None).

    Returns:
      y: (B, L, C); new_history: (B, K - 1, C), the last K - 1 inputs.
    """
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                        (self.width, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    batch, length, _ = x.shape
    if history is None:
      history = jnp.zeros((batch, self.width - 1, self.features), x.dtype)
    seq = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # (B, K - 1 + L, C)
    kernel = kernel.astype(self.dtype)
    y = bias.astype(self.dtype) + sum(
        seq[:, k:k + length] * kernel[k] for k in range(self.width))
    return y.astype(self.dtype), seq[:, seq.shape[1] - (self.width - 1):]


def gated_convolutions(gates: Sequence[Array], v: Array,
                       convolve: Callable[[int, Array], Array]) -> tuple[Array, list[Array]]:
  """Hyena's recurrence: for o = 0..N-2, `v <- convolve(o, v * gates[N-1-o])`; then `v * gates[0]`.

  Returns the output and the N - 1 convolution inputs (needed by the generation engine).
  """
  inputs = []
  for o, gate in enumerate(reversed(gates[1:])):
    a = v * gate
    inputs.append(a)
    v = convolve(o, a)
  return v * gates[0], inputs


def long_convolve(conv: Callable[..., Array], a: Array, h: Array, skip: Array, dtype: DType,
                  stream: Array | int | None = None) -> Array:
  """One long convolution with its skip term: conv(a, h) + a skip, a (B, L, D), h (>= L, D)
  or with `stream` h[:, stream] of h (>= L, S, D), skip (D,) (`convolution.convolve`),
  returned in `dtype`."""
  return convolution.convolve(conv, a, h, skip, stream=stream).astype(dtype)


def step_dense(dense: nn.Module, params: Any, x: Array) -> Array:
  """`dense(x)` for the one-position step, `x` (B, in) -> (B, out), with the kernel
  `params['kernel']` (in, out) in the dtype it is stored in.

  A kernel stored in the module's compute dtype goes through `dense` unchanged. A narrower one
  (bfloat16 step weights, `HyenaOnline(step_weights='bfloat16')`) is not converted here: the
  product of `x` and the stored kernel with products accumulated in float32 (`x` is not
  rounded), then the bias in float32. For a bfloat16 kernel and float32 `x` that product is
  `cpu_kernels.bf16_matmul` where its CPU kernel could be built (on CPU a custom call that
  reads the kernel as bfloat16, 2 bytes per weight; elsewhere the same `dot_general` as
  below), unless traced inside `cpu_kernels.disabled()` (the engine on a device mesh: XLA
  splits a dot over the mesh, not a custom call). Otherwise, or for other dtypes, one
  `dot_general` with `preferred_element_type` float32, which XLA:CPU computes from a float32
  copy of the kernel (made once, before the token loop; a warning says so once when the CPU
  kernel is unavailable).
  """
  kernel = params["kernel"]
  compute = jnp.promote_types(x.dtype, jnp.float32)
  if kernel.dtype == jnp.dtype(dense.dtype or compute):
    return dense(x)
  if (kernel.dtype == jnp.bfloat16 and x.dtype == jnp.float32 and cpu_kernels.enabled()
      and _bf16_kernel_available()):
    y = cpu_kernels.bf16_matmul(x, kernel)
  else:
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=compute)
  return y + params["bias"].astype(compute)


_warned_unavailable = False


def _bf16_kernel_available() -> bool:
  """Whether `cpu_kernels.bf16_matmul` can run; if not, warns once (on a CPU backend) that
  bfloat16 step weights are read as float32 copies here."""
  global _warned_unavailable
  if cpu_kernels.available():
    return True
  if not _warned_unavailable and jax.default_backend() == "cpu":
    _warned_unavailable = True
    warnings.warn("bfloat16 step weights are read as float32 on this machine (XLA:CPU has no "
                  "bfloat16 dot, and the bfloat16 CPU kernel is unavailable: "
                  f"{cpu_kernels.unavailable_reason()}).", RuntimeWarning, stacklevel=3)
  return False


class HyenaOperator(nn.Module):
  """The Hyena mixer of order N: in-projection, short convolution, N - 1 gated long
  convolutions with an implicit filter, out-projection."""

  config: HyenaConfig
  long_conv: str = "fft"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    cfg = self.config
    width = (cfg.order + 1) * cfg.d_model
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.in_proj = nn.Dense(width, **dense)
    self.short_conv = ShortConv(width, cfg.short_filter_order, **dense)
    self.filter = ImplicitFilter(
        features=cfg.num_convolutions * cfg.d_model, l_max=cfg.l_max, emb_dim=cfg.emb_dim,
        width=cfg.filter_order, num_inner_mlps=cfg.num_inner_mlps,
        activation_freq=cfg.activation_freq, modulate=cfg.modulate,
        modulation_shift=cfg.modulation_shift, fast_decay_pct=cfg.fast_decay_pct,
        slow_decay_pct=cfg.slow_decay_pct, decay_target=cfg.decay_target,
        param_dtype=self.param_dtype)
    self.out_proj = nn.Dense(cfg.d_model, **dense)

  def filters(self, length: int) -> tuple[Array, Array]:
    """Long filters `(length, N - 1, D)` and skip terms `(N - 1, D)`, float32."""
    cfg = self.config
    h = self.filter(length).reshape(length, cfg.num_convolutions, cfg.d_model)
    skip = self.filter.skip().reshape(cfg.num_convolutions, cfg.d_model)
    return h, skip.astype(h.dtype)

  def _split(self, z: Array) -> tuple[list[Array], Array]:
    parts = jnp.split(z, self.config.order + 1, axis=-1)
    return parts[:-1], parts[-1]

  def __call__(self, u: Array, taps: Array | None = None) -> tuple[Array, "MixerCache"]:
    """Parallel forward over `u` (B, L, D).

    Args:
      taps: (>= L, N - 1, D) long filters to use instead of the implicit filter's (the skip
        terms stay this module's), e.g. distilled ones; None: the module's own.
    Returns:
      y: (B, L, D); cache: the convolution inputs (N - 1, B, L, D) and the short-conv history.
    """
    length = u.shape[1]
    if length > self.config.l_max:
      raise ValueError(f"sequence length {length} exceeds the model's l_max = {self.config.l_max}.")
    gates, v, history = self.project(u)
    h, skip = self.filters(length)
    if taps is not None:
      h = taps[:length].astype(h.dtype)
    conv = convolution.long_convolution(self.long_conv)
    convolve = lambda o, a: long_convolve(conv, a, h, skip[o], self.dtype, stream=o)
    y, inputs = gated_convolutions(gates, v, convolve)
    return self.out_proj(y), MixerCache(jnp.stack(inputs), history)

  def project(self, u: Array, history: Array | None = None
              ) -> tuple[list[Array], Array, Array]:
    """In-projection and short convolution of `u` (B, L, D), positions that continue
    `history` (B, K - 1, (N + 1) D; None: the start): the N gates and v, each (B, L, D), and
    the new history."""
    z, history = self.short_conv(self.in_proj(u), history)
    gates, v = self._split(z)
    return gates, v, history

  def output(self, y: Array) -> Array:
    """The out-projection of the gated convolutions' output y (B, L, D)."""
    return self.out_proj(y)

  def step(self, u: Array, pending: Array, history: Array, diagonal: Array
           ) -> tuple[Array, Array, Array]:
    """One position: `u` (B, D); `pending` (N - 1, B, D) = each long convolution's output at
    this position from all earlier inputs; `history` (B, K - 1, (N+1) D); `diagonal`
    (N - 1, D) = filter tap 0 plus the skip term.

    Returns:
      y (B, D); the convolution inputs at this position (N - 1, B, D); the new history.
    """
    weights = self.variables["params"]
    z, history = self.short_conv(step_dense(self.in_proj, weights["in_proj"], u)[:, None],
                                 history)
    gates, v = self._split(z[:, 0])

    def convolve(o, a):
      return (pending[o] + a.astype(diagonal.dtype) * diagonal[o]).astype(self.dtype)

    y, inputs = gated_convolutions(gates, v, convolve)
    return step_dense(self.out_proj, weights["out_proj"], y), jnp.stack(inputs), history


class MixerCache(NamedTuple):
  """What a parallel forward leaves for generation to continue from.

  conv_inputs: (N - 1, B, L, D) inputs of every long convolution (per layer once stacked).
  history: (B, K - 1, (N + 1) D) the last in-projection outputs, for the short convolution.
  """
  conv_inputs: Array
  history: Array


class Mlp(nn.Module):
  """fc1 -> GELU (tanh approximation) -> fc2."""

  features: int
  hidden: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.fc1 = nn.Dense(self.hidden, **dense)
    self.fc2 = nn.Dense(self.features, **dense)

  def __call__(self, x: Array) -> Array:
    """x (..., features) -> (..., features)."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))

  def step(self, x: Array) -> Array:
    """One position, x (B, features): as `__call__`, the kernels read as stored
    (`step_dense`)."""
    weights = self.variables["params"]
    x = step_dense(self.fc1, weights["fc1"], x)
    return step_dense(self.fc2, weights["fc2"], jax.nn.gelu(x, approximate=True))


class HyenaBlock(nn.Module):
  """Pre-norm residual block: `x + mixer(norm1(x))`, then `x + mlp(norm2(x))`.

  `__call__` has the `(carry, taps) -> (carry, out)` form so that `nn.scan` stacks the blocks.
  """

  config: HyenaConfig
  long_conv: str = "fft"
  collect_cache: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    cfg = self.config
    norm = dict(epsilon=cfg.layer_norm_epsilon, use_fast_variance=False,
                dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm1 = nn.LayerNorm(**norm)
    self.mixer = HyenaOperator(cfg, self.long_conv, self.dtype, self.param_dtype)
    self.norm2 = nn.LayerNorm(**norm)
    self.mlp = Mlp(cfg.d_model, cfg.d_inner, self.dtype, self.param_dtype)

  def _residual(self, x: Array) -> Array:
    if self.config.residual_in_fp32:
      return x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return x.astype(self.dtype)

  def __call__(self, x: Array, taps: Array | None = None) -> tuple[Array, MixerCache | None]:
    """x: residual stream (B, L, D); taps: as in `HyenaOperator.__call__`. Returns the new
    stream and, if collected, the cache."""
    y, cache = self.mixer(self.norm1(x), taps)
    return self.finish(x, y), (cache if self.collect_cache else None)

  def project(self, x: Array, history: Array | None = None
              ) -> tuple[list[Array], Array, Array]:
    """The mixer's gates, v and short-convolution history for the residual stream x (B, L, D)
    (`HyenaOperator.project` of norm1(x)): the part of `__call__` before the long
    convolutions, for a run of positions."""
    return self.mixer.project(self.norm1(x), history)

  def finish(self, x: Array, y: Array) -> Array:
    """The residual stream after the mixer's output y (B, L, D): x + y, then the MLP's
    residual; pointwise in the positions."""
    x = self._residual(x + y)
    return self._residual(x + self.mlp(self.norm2(x)))

  def output(self, y: Array) -> Array:
    """`HyenaOperator.output`: the out-projection of the gated convolutions' output."""
    return self.mixer.output(y)

  def step(self, x: Array, pending: Array, history: Array, diagonal: Array
           ) -> tuple[Array, Array, Array]:
    """One position of the block; arguments as in `HyenaOperator.step`, `x` (B, D). The dense
    kernels (in_proj, out_proj, fc1, fc2) may be stored narrower than the compute dtype
    (bfloat16 step weights): they are then read as stored, products accumulated in float32
    (`step_dense`)."""
    y, inputs, history = self.mixer.step(self.norm1(x), pending, history, diagonal)
    x = self._residual(x + y)
    x = self._residual(x + self.mlp.step(self.norm2(x)))
    return x, inputs, history

  def filters(self, length: int) -> tuple[Array, Array]:
    """This block's long filters `(length, N - 1, D)` and skip terms `(N - 1, D)`."""
    return self.mixer.filters(length)
