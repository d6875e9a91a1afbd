"""Preemption (SIGTERM): the loop saves and stops at the next step boundary.

One process: a SIGTERM handler sets a flag. Several: every process must stop at the same step,
so the JAX coordination service decides (`CheckpointManager.reached_preemption`, whose notifier
catches SIGTERM on every host); no Python handler is installed then.
"""

import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging


class Preemption:
  """`reached(step)`: whether to save and stop after `step`. `close()` restores the previous
  SIGTERM handler."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager, self.requested, self.previous = manager, False, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.requested

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
