"""Which tokenizer a model's vocabulary implies."""

from __future__ import annotations

from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.text import bytes as bytes_lib
from lcsm_jax.text import hyenadna
from lcsm_jax.text.base import Tokenizer


def tokenizer_for(config: HyenaConfig) -> Tokenizer:
  """The tokenizer implied by the vocabulary size: 256 -> bytes, 12 -> HyenaDNA characters."""
  if config.vocab_size == bytes_lib.VOCAB_SIZE:
    return bytes_lib.ByteTokenizer()
  if config.vocab_size == len(hyenadna.HYENADNA_VOCAB):
    return hyenadna.CharacterTokenizer()
  raise ValueError(
      f"no tokenizer is known for a vocabulary of {config.vocab_size} ids: lcsm_jax knows UTF-8 "
      f"bytes ({bytes_lib.VOCAB_SIZE} ids) and the HyenaDNA character tokenizer "
      f"({len(hyenadna.HYENADNA_VOCAB)} ids: {', '.join(hyenadna.HYENADNA_VOCAB)}).")
