"""The decoding engine: exact (and, later, approximate) autoregressive generation for any model
that implements `models.interface.OnlineModel`, with the strategies of `strategies.REGISTRY`.

  Decoder      resumable generation from a language model (prefill, generate, score)
  Rollout      the same for vector models whose output is the next input (ConvStack)
  generate, teacher_forced_logits   one-call wrappers of Decoder
  Engine       model + strategy + length: tables, prefill, runs of positions (model-agnostic)
  clear_caches forget the compiled programs kept by the library and by JAX
"""

from lcsm_jax.decoding.decoder import Decoder, DecodeState, GenerationOutput
from lcsm_jax.decoding.engine import Engine, EngineState, EngineTables
from lcsm_jax.decoding.functions import generate, teacher_forced_logits
from lcsm_jax.decoding.memory import InsufficientMemoryError
from lcsm_jax.decoding.options import EngineOptions, parse_tau
from lcsm_jax.decoding.rollout import Rollout, RolloutState, rollout
from lcsm_jax.decoding.session import clear_caches
from lcsm_jax.decoding.strategies import EXACT_STRATEGIES, STRATEGIES

__all__ = [
    "DecodeState", "Decoder", "EXACT_STRATEGIES", "Engine", "EngineOptions", "EngineState",
    "EngineTables", "GenerationOutput", "InsufficientMemoryError", "Rollout", "RolloutState",
    "STRATEGIES", "clear_caches", "generate", "parse_tau", "rollout", "teacher_forced_logits",
]
