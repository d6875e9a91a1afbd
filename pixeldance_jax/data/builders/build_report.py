"""Shared by the local-collection builders: parallel decoding and the skipped-input report."""

import collections
import dataclasses
import multiprocessing
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import tqdm

from pixeldance_jax.data import media

# Messages kept per skip reason, so the report names real files without growing unbounded.
_EXAMPLES_PER_REASON = 5


@dataclasses.dataclass
class BuildReport:
  """Counts of written and skipped inputs, per split and skip reason."""
  written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: dict[str, collections.Counter] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(collections.Counter))
  examples: dict[str, list[str]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))

  def skip(self, split: str, reason: str, message: str) -> None:
    self.skipped[split][reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
      self.examples[reason].append(message)

  def as_dict(self) -> dict[str, Any]:
    return {"written": dict(self.written),
            "skipped": {split: dict(counts) for split, counts in self.skipped.items()},
            "skipped_examples": dict(self.examples)}

  def summary(self) -> str:
    skipped = sum(sum(counts.values()) for counts in self.skipped.values())
    lines = [f"wrote {dict(self.written)}; skipped {skipped} inputs"]
    for split, counts in sorted(self.skipped.items()):
      lines.append(f"  {split}: " + ", ".join(f"{reason} {count}"
                                            for reason, count in sorted(counts.items())))
    for reason, messages in sorted(self.examples.items()):
      lines += [f"  e.g. {reason}: {message}" for message in messages]
    return "\n".join(lines)


def _run(task: tuple[Callable, tuple]) -> tuple[Any, tuple[str, str] | None]:
  """(result, None) or (None, (skip reason, message)); picklable for worker processes."""
  function, args = task
  try:
    return function(*args), None
  except media.SkippedInput as error:
    return None, (error.reason, str(error))


def map_inputs(function: Callable, arguments: Iterable[tuple], total: int, workers: int,
               description: str) -> Iterator[tuple[Any, tuple[str, str] | None]]:
  """`_run(function, args)` for each args, in order, on `workers` processes, with progress.

  "spawn" workers: the building process may already run JAX threads, which fork would copy in
  an unknown state. Results come back in input order, so the written order is deterministic.
  """
  tasks = ((function, args) for args in arguments)
  progress = tqdm.tqdm(total=total, desc=description, unit="file", dynamic_ncols=True)
  with progress:
    if workers <= 1:
      results = map(_run, tasks)
      yield from _with_progress(results, progress)
      return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      yield from _with_progress(pool.imap(_run, tasks, chunksize=4), progress)


def _with_progress(results: Iterable, progress: tqdm.tqdm) -> Iterator:
  skipped = 0
  for result, skip in results:
    skipped += skip is not None
    progress.update(1)
    progress.set_postfix(skipped=skipped, refresh=False)
    yield result, skip


def log_report(name: str, report: BuildReport) -> None:
  logging.info("Built %s: %s", name, report.summary())
