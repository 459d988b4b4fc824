"""lcsm_jax: exact, quasi-linear autoregressive generation for long-convolution sequence models.

The public surface: model configs and parameters, checkpoint loading, and `generate` /
`teacher_forced_logits` with the `flash`, `lazy`, `eager` and `recompute` strategies.
"""

from lcsm_jax.checkpoint import CheckpointError, load_hyenadna, load_params, read_metadata, save_params
from lcsm_jax.config import PRESETS, HyenaConfig, preset
from lcsm_jax.engine import STRATEGIES, EngineOptions
from lcsm_jax.generation import GenerationOutput, generate, teacher_forced_logits
from lcsm_jax.model import HyenaLM, cast_params, init_params
from lcsm_jax.pretrained import load_byte_lm

__all__ = [
    "CheckpointError", "EngineOptions", "GenerationOutput", "HyenaConfig", "HyenaLM", "PRESETS", "STRATEGIES",
    "cast_params", "generate", "init_params", "load_byte_lm", "load_hyenadna", "load_params",
    "preset", "read_metadata", "save_params", "teacher_forced_logits",
]
