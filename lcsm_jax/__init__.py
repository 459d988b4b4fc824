"""lcsm_jax: exact, quasi-linear autoregressive generation for long-convolution sequence models.

The public surface: model configs and parameters, checkpoints, the resumable `Decoder` and the
one-call `generate` / `teacher_forced_logits`, with the strategies of `STRATEGIES` (the exact
ones, and 'modal' on the filters `distill` fits).
"""

from lcsm_jax.decoding import (STRATEGIES, DecodeState, Decoder, EngineOptions, GenerationOutput,
                               InsufficientMemoryError, clear_caches, generate,
                               teacher_forced_logits)
from lcsm_jax.distillation import Distilled, distill
from lcsm_jax.errors import CheckpointError
from lcsm_jax.io import load_byte_lm, load_hyenadna, load_params, read_metadata, save_params
from lcsm_jax.models.hyena import PRESETS, HyenaConfig, HyenaLM, cast_params, init_params, preset

__all__ = [
    "CheckpointError", "DecodeState", "Decoder", "Distilled", "EngineOptions", "GenerationOutput",
    "HyenaConfig", "HyenaLM", "InsufficientMemoryError", "PRESETS", "STRATEGIES", "cast_params",
    "clear_caches", "distill", "generate", "init_params", "load_byte_lm", "load_hyenadna",
    "load_params", "preset", "read_metadata", "save_params", "teacher_forced_logits",
]
