"""Test helpers: this project's parameters -> a HyenaDNA (PyTorch-layout) state dict.

Written key by key from the HyenaDNA module structure, independently of the table in
`lcsm_jax/io/hyenadna.py` that maps the other way, so that the random-model tests can run the
independent NumPy reference (`numpy_reference.py`) on Flax-initialised parameters, and the
two mappings can be checked against each other by a round trip.
"""

from __future__ import annotations

import numpy as np


def _np(x, dtype):
  return np.array(x, dtype=dtype)


def state_dict_from_params(config, params, dtype=np.float64):
  """`{'params': ...}` of `HyenaLM(config)` -> `{torch key: array}` (PyTorch layout).

  PyTorch `Linear.weight` is (out, in) where Flax `Dense.kernel` is (in, out); the short filter
  is a depthwise `Conv1d` with weight (channels, 1, K); the filter MLP's `Sin` modules share one
  `freq` of shape (1, width), stored under every activation's key; the positional tables carry
  a leading axis of 1 and `deltas` has shape (1, 1, channels).
  """
  p = params["params"]
  blocks = p["stack"]["blocks"]
  state = {
      "backbone.embeddings.word_embeddings.weight": _np(p["embedder"]["embedding"], dtype),
      "backbone.ln_f.weight": _np(p["ln_f"]["scale"], dtype),
      "backbone.ln_f.bias": _np(p["ln_f"]["bias"], dtype),
  }
  for layer in range(config.n_layer):
    blk = lambda *path: _np(_get(blocks, path)[layer], dtype)  # noqa: E731
    pre = f"backbone.layers.{layer}."
    state[pre + "norm1.weight"] = blk("norm1", "scale")
    state[pre + "norm1.bias"] = blk("norm1", "bias")
    state[pre + "norm2.weight"] = blk("norm2", "scale")
    state[pre + "norm2.bias"] = blk("norm2", "bias")
    state[pre + "mixer.in_proj.weight"] = blk("mixer", "in_proj", "kernel").T
    state[pre + "mixer.in_proj.bias"] = blk("mixer", "in_proj", "bias")
    state[pre + "mixer.out_proj.weight"] = blk("mixer", "out_proj", "kernel").T
    state[pre + "mixer.out_proj.bias"] = blk("mixer", "out_proj", "bias")
    kernel = blk("mixer", "short_conv", "kernel")  # (K, C)
    state[pre + "mixer.short_filter.weight"] = kernel.T[:, None, :]  # (C, 1, K)
    state[pre + "mixer.short_filter.bias"] = blk("mixer", "short_conv", "bias")
    state[pre + "mlp.fc1.weight"] = blk("mlp", "fc1", "kernel").T
    state[pre + "mlp.fc1.bias"] = blk("mlp", "fc1", "bias")
    state[pre + "mlp.fc2.weight"] = blk("mlp", "fc2", "kernel").T
    state[pre + "mlp.fc2.bias"] = blk("mlp", "fc2", "bias")
    ff = pre + "mixer.filter_fn."
    state[ff + "bias"] = blk("mixer", "filter", "bias")
    state[ff + "modulation.deltas"] = blk("mixer", "filter", "deltas")[None, None, :]
    state[ff + "pos_emb.z"] = blk("mixer", "filter", "z")[None]
    state[ff + "pos_emb.t"] = blk("mixer", "filter", "t")[None]
    freq = blk("mixer", "filter", "freq")[None, :]
    # implicit_filter = Sequential(Linear, Sin, [Linear, Sin] * num_inner_mlps, Linear).
    for i in range(config.num_inner_mlps + 1):
      state[ff + f"implicit_filter.{2 * i}.weight"] = blk("mixer", "filter", f"dense_{i}",
                                                          "kernel").T
      state[ff + f"implicit_filter.{2 * i}.bias"] = blk("mixer", "filter", f"dense_{i}", "bias")
      state[ff + f"implicit_filter.{2 * i + 1}.freq"] = freq.copy()
    last = 2 * (config.num_inner_mlps + 1)
    state[ff + f"implicit_filter.{last}.weight"] = blk("mixer", "filter", "output", "kernel").T
  return state


def reference_config(config):
  """The keyword dict `numpy_reference.hyenadna_logits` takes, for a `HyenaConfig`."""
  return dict(d_model=config.d_model, n_layer=config.n_layer, eps=config.layer_norm_epsilon,
              order=config.order, short_filter_order=config.short_filter_order,
              num_inner_mlps=config.num_inner_mlps, modulate=config.modulate,
              shift=config.modulation_shift)


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree
