"""Reading a compiled (optimized, SPMD-partitioned) HLO module's text: its collectives.

The TPU compiler writes a reduce-scatter as a fusion that calls an `%all-reduce-scatter`
computation (an all-reduce of the whole array and the slice of it this device keeps, done as
one); every other collective is an instruction of its own, or an async `-start` / `-done` pair.
"""

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+"
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_REDUCE_SCATTER_CALL = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+fusion\(.*"
                                  r"calls=(%all-reduce-scatter[\w.\-]*)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s*\((.*)\)\s*->")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class Collective:
  kind: str  # One of KINDS.
  bytes: int  # The whole array's bytes: gathered, before scattering, or reduced.
  shape: str  # The largest array involved, e.g. "bf16[8,1280]" (a combined one holds several).
  op_name: str  # The JAX operation it came from (metadata), "" if none.
  arrays: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (bytes, shape) each.


def array_bytes(shape_text: str) -> list[tuple[int, str]]:
  """(bytes, "dtype[dims]") of every array written in `shape_text` (a tuple lists several)."""
  arrays = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _BYTES:
      count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      arrays.append((count * _BYTES[dtype], f"{dtype}[{dims}]"))
  return arrays


def _largest(shape_text: str) -> tuple[int, str]:
  arrays = array_bytes(shape_text)
  return max(arrays) if arrays else (0, shape_text[:40])


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of the module, once each (an async pair counts as one)."""
  found, current = [], None
  scatter_inputs = {}  # %all-reduce-scatter computation -> its input's (bytes, shape).
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      if current.startswith("%all-reduce-scatter"):
        scatter_inputs[current] = _largest(header.group(2))
      continue
    if current and current.startswith("%all-reduce-scatter"):
      continue  # The all-reduce inside is the reduce-scatter, counted at its call.
    op_name = _OP_NAME.search(line)
    op_name = op_name.group(1) if op_name else ""
    call = _REDUCE_SCATTER_CALL.match(line)
    if call:
      size, shape = scatter_inputs.get(call.group(2), _largest(call.group(1)))
      found.append(Collective("reduce-scatter", size, shape, op_name, [(size, shape)]))
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      size, shape = _largest(instruction.group(1))
      if not instruction.group(3):  # A combined collective's tuple holds one result per array.
        size = sum(bytes_ for bytes_, _ in array_bytes(instruction.group(1)))
      if instruction.group(2) == "reduce-scatter":
        size *= _group_size(line)
      arrays = array_bytes(instruction.group(1))
      if instruction.group(3):  # An async start's tuple holds its operands and results.
        arrays = [max(arrays)] if arrays else []
      found.append(Collective(instruction.group(2), size, shape, op_name, arrays))
  return found


def _group_size(line: str) -> int:
  """Devices per replica group of a collective (`{{0,1,2,3},...}` or iota `[2,4]<=[8]`)."""
  explicit = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if explicit:
    return len(explicit.group(1).split(","))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  return int(iota.group(2)) if iota else 1


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} over KINDS (zeros included)."""
  table = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
  for collective in found:
    table[collective.kind]["count"] += 1
    table[collective.kind]["bytes"] += collective.bytes
  return table


def by_kind(found: list[Collective]) -> dict[str, list[Collective]]:
  grouped = collections.defaultdict(list)
  for collective in found:
    grouped[collective.kind].append(collective)
  return grouped


def custom_calls(hlo_text: str) -> dict[str, int]:
  """{custom_call_target: count}: kernels XLA does not generate itself (Mosaic's
  "tpu_custom_call" for Pallas kernels such as splash attention, cuDNN's on GPU)."""
  return dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))
