"""Checkpoint formats: HyenaDNA state dicts in (`hyenadna`), the project's own format in and out
(`native`, with the distilled section of `distilled`; StripedHyena's distilled-filter files),
the shipped byte-level model (`pretrained`), and `load_checkpoint` (`detect`) for any
of them."""

from lcsm_jax.errors import CheckpointError
from lcsm_jax.io.detect import load_checkpoint
from lcsm_jax.io.hyenadna import load_hyenadna
from lcsm_jax.io.distilled import export_stripedhyena, import_stripedhyena
from lcsm_jax.io.native import (has_distilled, load_distilled, load_params, read_metadata,
                                save_params)
from lcsm_jax.io.pretrained import load_byte_lm, load_byte_lm_heldout_sample

__all__ = [
    "CheckpointError", "export_stripedhyena", "has_distilled", "import_stripedhyena",
    "load_byte_lm", "load_byte_lm_heldout_sample", "load_checkpoint", "load_distilled",
    "load_hyenadna", "load_params", "read_metadata", "save_params",
]
