"""The one report of weights that do not fit a model: the tensors a file lacks, those it holds
that the model has not, and those of another shape. Every loader (converted checkpoints, Orbax
checkpoints, the evaluation networks' weights) raises it, so a bad file reads the same anywhere
and is diagnosed in one run."""

from collections.abc import Mapping, Sequence
from typing import Any

SHOWN = 8  # Entries listed per kind of problem; the rest are counted.


def compare(expected: Mapping[str, Any], found: Mapping[str, Any]
            ) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, misshapen) of `found` against `expected` (name -> shape each)."""
  missing = sorted(expected.keys() - found.keys())
  unexpected = sorted(found.keys() - expected.keys())
  misshapen = sorted(f"{name}: {tuple(found[name])}, expected {tuple(expected[name])}"
                     for name in expected.keys() & found.keys()
                     if tuple(found[name]) != tuple(expected[name]))
  return missing, unexpected, misshapen


def check(what: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
          misshapen: Sequence[str] = (), other: Sequence[tuple[str, Sequence[str]]] = (),
          shown: int | None = SHOWN) -> None:
  """Raises one ValueError if any list is not empty: `what`, the count of each kind, then the
  first `shown` entries of each (all with None), one per line. `other`: further (kind,
  entries), e.g. a file's duplicate names."""
  kinds = [(kind, list(items)) for kind, items in
           [("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen), *other]
           if items]
  if not kinds:
    return
  lines = [f"{what}: " + ", ".join(f"{len(items)} {kind}" for kind, items in kinds) + "."]
  for kind, items in kinds:
    listed = items if shown is None else items[:shown]
    lines += [f"  {kind}: {item}" for item in listed]
    if len(listed) < len(items):
      lines.append(f"  ... and {len(items) - len(listed)} more {kind}")
  raise ValueError("\n".join(lines))
