"""Errors that library code raises and the commands print as one line per problem."""

import difflib
from collections.abc import Sequence


class ConfigError(ValueError):
  """A config that cannot work, found before any work is done; one line per problem."""


def closest(word: str, candidates: Sequence[str]) -> list[str]:
  """The candidate most like `word` (a list of 0 or 1): one with the same letters in another
  order ("ddmi" -> "ddim"), else difflib's closest match, else one that `word` begins
  ("dots" -> "dots_saveable")."""
  candidates = sorted(candidates)
  anagrams = [c for c in candidates if sorted(c) == sorted(word)]
  prefixed = [c for c in candidates if word and c.startswith(word)]
  return anagrams[:1] or difflib.get_close_matches(word, candidates, n=1) or prefixed[:1]
