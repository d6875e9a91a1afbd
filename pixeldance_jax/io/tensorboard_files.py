"""TensorBoard event files: the writer training logs with, and a reader of the scalars a run
logged (for the commands that show a run's history, and the tests).

An event file is a sequence of TFRecords, each an `Event` proto: a little-endian uint64 length,
its masked CRC32C (4 bytes), the proto, and the proto's masked CRC32C (4 bytes).
"""

import glob
import os
import struct
import sys


def _import_tensorboardx():
  """tensorboardX imports torch, where it is installed, only to accept torch tensors, which
  slows every training start; it is imported with torch hidden (unless torch is loaded)."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX goes on.
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter, summary_pb2, event_pb2


SummaryWriter, summary_pb2, event_pb2 = _import_tensorboardx()

_HEADER = 12  # The length (8 bytes) and its CRC (4).
_FOOTER = 4  # The proto's CRC.


def read_events(folder: str) -> list["event_pb2.Event"]:
  """Every `Event` of the files `events*` in `folder`, in the order they were written (by wall
  time; a file's own order among equal times). A record cut short at a file's end (a writer
  killed mid-write) is left out."""
  events = []
  for path in sorted(glob.glob(os.path.join(folder, "events*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset + _HEADER <= len(data):
      length = struct.unpack("<Q", data[offset:offset + 8])[0]
      end = offset + _HEADER + length
      if end + _FOOTER > len(data):
        break
      events.append(event_pb2.Event.FromString(data[offset + _HEADER:end]))
      offset = end + _FOOTER
  return sorted(events, key=lambda event: event.wall_time)


def all_scalars(folder: str) -> dict[str, dict[int, float]]:
  """`{tag: {step: value}}` of every scalar in `folder`, by step, as the run that went on
  logged it: a step at or below one already logged under a tag means training resumed from an
  earlier checkpoint, and drops what the abandoned run had logged under it from that step on
  (as TensorBoard purges orphaned data)."""
  found: dict[str, dict[int, float]] = {}
  last: dict[str, int] = {}  # The step each tag was last logged at.
  for event in read_events(folder):
    for value in event.summary.value:
      if value.WhichOneof("value") != "simple_value":
        continue
      steps = found.setdefault(value.tag, {})
      if event.step <= last.get(value.tag, -1):
        found[value.tag] = steps = {step: kept for step, kept in steps.items()
                                    if step < event.step}
      steps[event.step], last[value.tag] = value.simple_value, event.step
  return {tag: dict(sorted(steps.items())) for tag, steps in found.items()}


def scalars(folder: str, tag: str) -> dict[int, float]:
  """`{step: value}` of one scalar tag (`all_scalars`)."""
  return all_scalars(folder).get(tag, {})
