"""The byte-level Hyena language model shipped with the package (`lcsm_jax/assets/byte_lm/`).

Trained by `experiments/train_lm.py` (default flags) on the Python standard library's source;
see WORKSPACE.md ("The shipped byte-level model"). The files are read through
`importlib.resources`, so this works from a wheel or a zip as well as from a source checkout.
"""

from __future__ import annotations

import importlib.resources
import io
import json
from typing import Any

import numpy as np
from flax import traverse_util

from lcsm_jax.io import native
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.params import check_params

BYTE_LM = ("assets", "byte_lm")


def _asset(name: str):
  node = importlib.resources.files("lcsm_jax")
  for part in BYTE_LM + (name,):
    node = node.joinpath(part)
  if not node.is_file():
    raise FileNotFoundError(f"the packaged byte LM is missing {'/'.join(BYTE_LM + (name,))}; "
                            "was lcsm_jax installed without its package data?")
  return node


def load_byte_lm() -> tuple[HyenaConfig, dict[str, Any], dict[str, Any]]:
  """The shipped byte-level model.

  Returns:
    (config, params, metrics): `params` is `{'params': ...}` (NumPy float32) for
    `HyenaLM(config).apply`; `metrics` is the training record (held-out and unigram
    perplexity, steps, wall time, Python version, command, ...).
  """
  from safetensors.numpy import load as load_safetensors
  config = HyenaConfig.from_hyenadna_dict(json.loads(_asset("config.json").read_text("utf-8")))
  flat = load_safetensors(_asset(native.OWN_WEIGHTS).read_bytes())
  params = traverse_util.unflatten_dict(flat, sep="/")
  check_params(config, params)
  metrics = json.loads(_asset("metrics.json").read_text("utf-8"))
  return config, params, metrics


def load_byte_lm_heldout_sample() -> np.ndarray:
  """The held-out windows (int32, (N, seq_len + 1)) on which `metrics['heldout_sample_loss']`
  was measured: the first windows of the evaluation set, stored so the number can be checked
  on any Python version."""
  sample = np.load(io.BytesIO(_asset("heldout_sample.npy").read_bytes()), allow_pickle=False)
  return np.asarray(sample).astype(np.int32)
