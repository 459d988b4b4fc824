"""An independent float64 NumPy implementation of the HyenaDNA forward, for tests only.

It reads the HyenaDNA state dict directly (PyTorch layout, PyTorch key names) and uses the
direct O(L^2) causal convolution, so it shares no code with `lcsm_jax`'s model or loader.
"""

from __future__ import annotations

import math

import numpy as np


def _linear(x, state, name, bias=True):
  y = x @ state[f"{name}.weight"].T
  return y + state[f"{name}.bias"] if bias else y


def _layer_norm(x, state, name, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _causal_conv(u, h):
  """u: (B, L, C), h: (>=L, C) -> (B, L, C), direct sum over lags."""
  length = u.shape[1]
  y = np.zeros_like(u)
  for lag in range(length):
    y[:, lag:] += u[:, :length - lag] * h[lag]
  return y


def _implicit_filter(state, prefix, length, num_inner_mlps, modulate=True, shift=0.05):
  z = state[f"{prefix}.pos_emb.z"][0, :length]
  t = state[f"{prefix}.pos_emb.t"][0, :length]
  h = z
  for i in range(num_inner_mlps + 1):
    h = _linear(h, state, f"{prefix}.implicit_filter.{2 * i}")
    h = np.sin(state[f"{prefix}.implicit_filter.{2 * i + 1}.freq"] * h)
  h = _linear(h, state, f"{prefix}.implicit_filter.{2 * (num_inner_mlps + 1)}", bias=False)
  if modulate:
    h = h * (np.exp(-t * np.abs(state[f"{prefix}.modulation.deltas"][0])) + shift)
  return h  # (L, (order - 1) * D)


def hyenadna_logits(state, cfg, input_ids, num_inner_mlps=2):
  """Logits (B, L, padded_vocab) of the HyenaDNA reference architecture, float64.

  `cfg` holds d_model, n_layer, eps and optionally order (2), short_filter_order (3),
  num_inner_mlps (the argument's value), modulate (True) and shift (0.05).
  """
  state = {k: np.asarray(v, np.float64) for k, v in state.items()}
  d, order = cfg["d_model"], cfg.get("order", 2)
  width = cfg.get("short_filter_order", 3)
  num_inner_mlps = cfg.get("num_inner_mlps", num_inner_mlps)
  emb = state["backbone.embeddings.word_embeddings.weight"]
  residual = emb[np.asarray(input_ids)]
  length = residual.shape[1]
  for layer in range(cfg["n_layer"]):
    p = f"backbone.layers.{layer}"
    u = _layer_norm(residual, state, f"{p}.norm1", cfg["eps"])
    z = _linear(u, state, f"{p}.mixer.in_proj")
    kernel = state[f"{p}.mixer.short_filter.weight"][:, 0, :]  # (C, K)
    padded = np.concatenate([np.zeros((z.shape[0], width - 1, z.shape[2])), z], axis=1)
    zc = state[f"{p}.mixer.short_filter.bias"] + sum(
        padded[:, k:k + length] * kernel[:, k] for k in range(width))
    parts = [zc[..., i * d:(i + 1) * d] for i in range(order + 1)]
    gates, v = parts[:-1], parts[-1]
    h = _implicit_filter(state, f"{p}.mixer.filter_fn", length, num_inner_mlps,
                         modulate=cfg.get("modulate", True), shift=cfg.get("shift", 0.05))
    bias = state[f"{p}.mixer.filter_fn.bias"]
    for o, gate in enumerate(reversed(gates[1:])):
      a = v * gate
      v = _causal_conv(a, h[:, o * d:(o + 1) * d]) + a * bias[o * d:(o + 1) * d]
    y = _linear(v * gates[0], state, f"{p}.mixer.out_proj")
    residual = residual + y
    u = _layer_norm(residual, state, f"{p}.norm2", cfg["eps"])
    residual = residual + _linear(_gelu_tanh(_linear(u, state, f"{p}.mlp.fc1")), state, f"{p}.mlp.fc2")
  hidden = _layer_norm(residual, state, "backbone.ln_f", cfg["eps"])
  return hidden @ emb.T
