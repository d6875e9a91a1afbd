"""Shared by the local-collection builders: parallel decoding and the skipped-input report."""

import collections
import dataclasses
import multiprocessing
from concurrent import futures
from concurrent.futures import process
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
  """(result, None) or (None, (skip reason, message)); picklable for worker processes. Any
  error reading one input is that input's (reason "failed", its path and the error named)."""
  function, args = task
  try:
    return function(*args), None
  except media.SkippedInput as error:
    return None, (error.reason, str(error))
  except Exception as error:  # pylint: disable=broad-except
    return None, ("failed", f"{args[0]}: {type(error).__name__}: {error}")


def map_inputs(function: Callable, arguments: Iterable[tuple], total: int, workers: int,
               description: str) -> Iterator[tuple[Any, tuple[str, str] | None]]:
  """`_run(function, args)` for each args, in order, on `workers` processes, with progress.

  "spawn" workers: the building process may already run JAX threads, which fork would copy in
  an unknown state. Results come back in input order, so the written order is deterministic.
  A worker that dies (killed, out of memory) costs only its own input (`_pool_map`).
  """
  tasks = ((function, args) for args in arguments)
  progress = tqdm.tqdm(total=total, desc=description, unit="file", dynamic_ncols=True)
  with progress:
    if workers <= 1:
      yield from _with_progress(map(_run, tasks), progress)
    else:
      yield from _with_progress(_pool_map(tasks, workers), progress)


def _executor(workers: int) -> futures.ProcessPoolExecutor:
  return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _pool_map(tasks: Iterator[tuple[Callable, tuple]], workers: int
              ) -> Iterator[tuple[Any, tuple[str, str] | None]]:
  """`_run` of each task on a pool of `workers` processes, in order, a few tasks ahead. When a
  worker dies, the pool breaks and every task in flight fails with it: each is run again in a
  process of its own, and the one that dies again is skipped ("crashed") and named; then a new
  pool takes the rest."""
  executor = _executor(workers)
  in_flight: collections.deque = collections.deque()
  try:
    while True:
      while len(in_flight) < 2 * workers and (task := next(tasks, None)) is not None:
        in_flight.append((task, _submit(executor, task)))
      if not in_flight:
        return
      task, future = in_flight.popleft()
      try:
        yield future.result()
      except process.BrokenProcessPool:
        executor.shutdown(wait=True, cancel_futures=True)
        retried = [task] + [other for other, _ in in_flight]
        in_flight.clear()
        for other in retried:
          yield _run_alone(other)
        executor = _executor(workers)
  finally:
    executor.shutdown(wait=True, cancel_futures=True)


def _submit(executor: futures.ProcessPoolExecutor, task: tuple[Callable, tuple]
            ) -> futures.Future:
  """`executor.submit(_run, task)`. A pool that broke since the last result (a worker died
  meanwhile) refuses new tasks: the task gets a future that fails as the pool's others do, so
  it is run again with them."""
  try:
    return executor.submit(_run, task)
  except process.BrokenProcessPool as error:
    failed: futures.Future = futures.Future()
    failed.set_exception(error)
    return failed


def _run_alone(task: tuple[Callable, tuple]) -> tuple[Any, tuple[str, str] | None]:
  """`_run(task)` in a process of its own: a skip ("crashed") if that process dies too."""
  with _executor(1) as executor:
    try:
      return executor.submit(_run, task).result()
    except process.BrokenProcessPool:
      return None, ("crashed", f"{task[1][0]}: the process reading it died (killed, or out "
                               "of memory)")


def _with_progress(results: Iterable, progress: tqdm.tqdm) -> Iterator:
  skipped = 0
  for result, skip in results:
    skipped += skip is not None
    progress.update(1)
    progress.set_postfix(skipped=skipped, refresh=False)
    yield result, skip


def log_report(name: str, report: BuildReport) -> None:
  logging.info("Built %s: %s", name, report.summary())
