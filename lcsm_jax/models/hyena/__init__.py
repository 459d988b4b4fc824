"""The Hyena (HyenaDNA) language model: config, Flax modules, parameters."""

from lcsm_jax.models.hyena.config import PRESETS, HyenaConfig, preset
from lcsm_jax.models.hyena.model import HyenaLM, HyenaStack
from lcsm_jax.models.hyena.params import (cast_params, check_params, check_params_match,
                                          init_params, param_spec)

__all__ = [
    "HyenaConfig", "HyenaLM", "HyenaStack", "PRESETS", "cast_params", "check_params",
    "check_params_match", "init_params", "param_spec", "preset",
]
