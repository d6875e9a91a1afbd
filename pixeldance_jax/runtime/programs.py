"""Reusing traced and compiled programs within a process.

A program (the train step, the initialiser, the sampler) reads only some fields of the config;
`program_config` copies just those, so that reading any other field fails loudly when traced,
and `config_key` of that copy says when two configs give the same program. `ProgramCache`
keeps the last few programs by such keys: an ablation's variants, a test that builds several
pipelines, or an interactive session trace and compile each program once.
"""

import collections
import json
from typing import Any, Callable, Hashable, Iterable

import ml_collections


def config_key(config: ml_collections.ConfigDict) -> str:
  """A hashable snapshot of every field, to reuse what was traced or compiled for an equal
  config within a process (equal configs give equal programs)."""
  return json.dumps(config.to_dict(), sort_keys=True, default=repr)


def program_config(config: ml_collections.ConfigDict,
                   fields: Iterable[str]) -> ml_collections.ConfigDict:
  """A copy of `config` holding only `fields` (dotted: "data.frames" copies one leaf)."""
  program = ml_collections.ConfigDict()
  for field in fields:
    *parents, name = field.split(".")
    source, target = config, program
    for parent in parents:
      source = source[parent]
      if parent not in target:
        target[parent] = ml_collections.ConfigDict()
      target = target[parent]
    value = source[name]
    target[name] = value.copy_and_resolve_references() if isinstance(
        value, ml_collections.ConfigDict) else value
  return program


class ProgramCache:
  """The last few programs (or traces) built in this process, by key: an interactive session
  or a test that trains twice with one config compiles, or loads from the persistent cache,
  once."""

  def __init__(self, size: int = 8):
    self._size, self._entries = size, collections.OrderedDict()

  def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
    if key in self._entries:
      self._entries.move_to_end(key)
    else:
      self._entries[key] = build()
      if len(self._entries) > self._size:
        self._entries.popitem(last=False)
    return self._entries[key]
