"""Tokenizers shared by the command line and the API: UTF-8 bytes (the shipped model) and
HyenaDNA's characters. `encode` / `decode` are the byte tokenizer's."""

from lcsm_jax.text.base import Tokenizer
from lcsm_jax.text.bytes import VOCAB_SIZE, ByteTokenizer, decode, encode
from lcsm_jax.text.hyenadna import HYENADNA_VOCAB, CharacterTokenizer
from lcsm_jax.text.select import tokenizer_for

__all__ = [
    "ByteTokenizer", "CharacterTokenizer", "HYENADNA_VOCAB", "Tokenizer", "VOCAB_SIZE",
    "decode", "encode", "tokenizer_for",
]
