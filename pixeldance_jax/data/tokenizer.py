"""CLIP BPE tokenisation (numpy only) with the real CLIP vocabulary.

`instant_clip_tokenizer` ships the 49408-token CLIP vocab and merges, so no download and no
TensorFlow/PyTorch tokenizer is needed on the input hosts.
"""

import functools
import logging
import re
import unicodedata
from typing import Sequence

import instant_clip_tokenizer
import numpy as np

START_OF_TEXT = 49406
END_OF_TEXT = 49407


@functools.cache
def clip_tokenizer() -> instant_clip_tokenizer.Tokenizer:
  """The shared tokenizer; loading the vocab and merges takes ~0.1 s, so load once."""
  return instant_clip_tokenizer.Tokenizer()


# Unicode White_Space, as transformers' CLIPTokenizer (Rust regex) sees it: Python's `\s` also
# matches the separators \x1c-\x1f, which CLIPTokenizer keeps as byte tokens.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
# A literal special-token string in a caption is that token, as in CLIPTokenizer and OpenAI CLIP.
_SPECIAL_TOKENS = {"<|startoftext|>": START_OF_TEXT, "<|endoftext|>": END_OF_TEXT}
_SPECIAL = re.compile("(" + "|".join(re.escape(token) for token in _SPECIAL_TOKENS) + ")")


def normalize(text: str) -> str:
  """NFC + CLIP's `whitespace_clean` + lower-casing, as transformers' CLIPTokenizer.

  Python's `lower()` maps a word-final capital sigma to "ς" as OpenAI CLIP's tokenizer (trained
  with) does; CLIPTokenizer's Rust lower-casing gives "σ". ftfy fixes and HTML unescaping (OpenAI
  only) are not done, as in CLIPTokenizer.
  """
  text = unicodedata.normalize("NFC", text)
  return _WHITESPACE.sub(" ", text).strip().lower()


def bpe_ids(text: str) -> list[int]:
  """BPE ids of `text` without BOS/EOS; literal "<|startoftext|>"/"<|endoftext|>" map to theirs."""
  ids = []
  for piece in _SPECIAL.split(text):
    if piece in _SPECIAL_TOKENS:
      ids.append(_SPECIAL_TOKENS[piece])
    elif piece:
      ids.extend(clip_tokenizer().encode(normalize(piece)))
  return ids


def encode(text: str, max_length: int) -> tuple[list[int], bool]:
  """(BOS + BPE ids + EOS, truncated to `max_length` keeping EOS last; whether truncated)."""
  ids = [START_OF_TEXT, *bpe_ids(text), END_OF_TEXT]
  if len(ids) <= max_length:
    return ids, False
  return ids[:max_length - 1] + [END_OF_TEXT], True


def tokenize(texts: Sequence[str], max_length: int,
             pad_token_id: int = END_OF_TEXT) -> np.ndarray:
  """int32 `[len(texts), max_length]`: BOS, BPE ids, EOS, then `pad_token_id` padding.

  Texts longer than `max_length` keep their first tokens and end in EOS; a warning counts them.
  """
  if max_length < 2:
    raise ValueError(f"max_length must fit BOS and EOS, got {max_length}.")
  tokens = np.full((len(texts), max_length), pad_token_id, np.int32)
  truncated = 0
  for row, text in enumerate(texts):
    ids, was_truncated = encode(text, max_length)
    tokens[row, :len(ids)] = ids
    truncated += was_truncated
  if truncated:
    logging.warning("Truncated %d of %d texts to max_length=%d tokens.", truncated,
                    len(texts), max_length)
  return tokens


def empty_prompt_tokens(max_length: int, pad_token_id: int = END_OF_TEXT) -> np.ndarray:
  """int32 `[max_length]` tokens of "", the unconditional prompt for classifier-free guidance."""
  return tokenize([""], max_length, pad_token_id)[0]
