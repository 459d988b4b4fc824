"""HyenaDNA's character tokenizer: one token per nucleotide character."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lcsm_jax.text.base import Tokenizer

# The HyenaDNA character tokenizer (`CharacterTokenizer` of HazyResearch/hyena-dna with
# characters A, C, G, T, N): seven special tokens, then the characters from id 7.
HYENADNA_VOCAB = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]",
                  "A", "C", "G", "T", "N")


class CharacterTokenizer(Tokenizer):
  """One token per character of a fixed vocabulary (HyenaDNA's character tokenizer)."""

  name = "HyenaDNA characters (A=7, C=8, G=9, T=10, N=11)"
  default_prompt = "ACGT"

  def __init__(self, vocab: Sequence[str] = HYENADNA_VOCAB):
    self.vocab = tuple(vocab)
    self.characters = {tok: i for i, tok in enumerate(self.vocab) if len(tok) == 1}

  def encode(self, prompt: str) -> np.ndarray:
    prompt = prompt.upper()
    unknown = sorted(set(prompt) - set(self.characters))
    if unknown:
      raise ValueError(f"the prompt holds characters the HyenaDNA tokenizer does not know: "
                       f"{''.join(unknown)!r}; use only {''.join(self.characters)}.")
    return np.array([self.characters[c] for c in prompt], np.int32)

  def decoder(self) -> Callable[[np.ndarray, bool], str]:
    return lambda ids, final=False: "".join(self.vocab[i] for i in np.asarray(ids).reshape(-1))
