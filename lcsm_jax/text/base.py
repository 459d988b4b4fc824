"""The tokenizer interface, and the tokenizer a model's vocabulary implies."""

from __future__ import annotations

from typing import Callable

import numpy as np

from lcsm_jax.models.hyena.config import HyenaConfig


class Tokenizer:
  """Text <-> token ids for one vocabulary."""

  name: str = ""
  default_prompt: str = ""

  def encode(self, prompt: str) -> np.ndarray:
    """Prompt text -> int32 ids (P,)."""
    raise NotImplementedError

  def decoder(self) -> Callable[[np.ndarray, bool], str]:
    """An incremental decoder: `(ids (n,), final) -> text` for successive chunks."""
    raise NotImplementedError


def tokenizer_for(config: HyenaConfig) -> Tokenizer:
  """The tokenizer implied by the vocabulary size: 256 -> bytes, 12 -> HyenaDNA characters."""
  # Imported here: both modules define subclasses of `Tokenizer`, so they import this one.
  from lcsm_jax.text import bytes as bytes_lib
  from lcsm_jax.text import hyenadna
  if config.vocab_size == bytes_lib.VOCAB_SIZE:
    return bytes_lib.ByteTokenizer()
  if config.vocab_size == len(hyenadna.HYENADNA_VOCAB):
    return hyenadna.CharacterTokenizer()
  raise ValueError(
      f"no tokenizer is known for a vocabulary of {config.vocab_size} ids: lcsm_jax knows UTF-8 "
      f"bytes ({bytes_lib.VOCAB_SIZE} ids) and the HyenaDNA character tokenizer "
      f"({len(hyenadna.HYENADNA_VOCAB)} ids: {', '.join(hyenadna.HYENADNA_VOCAB)}).")
