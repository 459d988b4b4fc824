"""Byte-level tokenizer: a text is its UTF-8 bytes, so the vocabulary is the 256 byte values."""

from __future__ import annotations

import codecs
from typing import Callable, Iterable

import numpy as np

from lcsm_jax.text.base import Tokenizer

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
  """`text` -> its UTF-8 bytes as int32 token ids in [0, 256), shape (len(bytes),)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Token ids (any integer array or sequence, values in [0, 256)) -> text.

  Byte sequences that are not valid UTF-8 (e.g. a multi-byte character cut by a window
  boundary, or a sampled byte soup) decode to U+FFFD instead of raising.
  """
  return _to_bytes(ids).decode("utf-8", errors="replace")


def _to_bytes(ids: Iterable[int] | np.ndarray) -> bytes:
  """Token ids -> the bytes they stand for; ValueError for an id outside [0, 256)."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"byte ids must lie in [0, {VOCAB_SIZE}), got values in "
                     f"[{ids.min()}, {ids.max()}].")
  return ids.astype(np.uint8).tobytes()


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes (`encode` / `decode`); a character split between chunks is printed once whole."""

  name = "bytes (UTF-8)"
  default_prompt = "def "

  def encode(self, prompt: str) -> np.ndarray:
    return encode(prompt)

  def decoder(self) -> Callable[[np.ndarray, bool], str]:
    incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda ids, final=False: incremental.decode(_to_bytes(ids), final)
