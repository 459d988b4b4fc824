"""The tokenizer interface."""

from __future__ import annotations

from typing import Callable

import numpy as np


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
