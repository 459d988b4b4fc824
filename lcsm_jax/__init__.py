"""lcsm_jax: exact, quasi-linear autoregressive generation for long-convolution sequence models.

The public surface: model configs and parameters, checkpoint loading, and `generate` /
`teacher_forced_logits` with the `flash`, `lazy`, `eager` and `recompute` strategies.
"""

from lcsm_jax.engine import STRATEGIES, EngineOptions
from lcsm_jax.errors import CheckpointError
from lcsm_jax.generation import GenerationOutput, generate, teacher_forced_logits
from lcsm_jax.io import load_byte_lm, load_hyenadna, load_params, read_metadata, save_params
from lcsm_jax.models.hyena import PRESETS, HyenaConfig, HyenaLM, cast_params, init_params, preset

__all__ = [
    "CheckpointError", "EngineOptions", "GenerationOutput", "HyenaConfig", "HyenaLM", "PRESETS",
    "STRATEGIES", "cast_params", "generate", "init_params", "load_byte_lm", "load_hyenadna",
    "load_params", "preset", "read_metadata", "save_params", "teacher_forced_logits",
]
