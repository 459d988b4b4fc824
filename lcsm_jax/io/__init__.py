"""Checkpoint formats: HyenaDNA state dicts in (`hyenadna`), the project's own format in and out
(`native`), the shipped byte-level model (`pretrained`), and `load_checkpoint` (`detect`) for any
of them."""

from lcsm_jax.errors import CheckpointError
from lcsm_jax.io.detect import load_checkpoint
from lcsm_jax.io.hyenadna import load_hyenadna
from lcsm_jax.io.native import load_params, read_metadata, save_params
from lcsm_jax.io.pretrained import load_byte_lm, load_byte_lm_heldout_sample

__all__ = [
    "CheckpointError", "load_byte_lm", "load_byte_lm_heldout_sample", "load_checkpoint",
    "load_hyenadna", "load_params", "read_metadata", "save_params",
]
