"""Where the train step's time goes, from XLA's own profile: milliseconds per kind of operation.

  python benchmarks/profile_step.py [--run=tiny@1x1x1] [--profile_steps=3] [--top=25]
  taskset -c 0 python benchmarks/profile_step.py   # One core, as the torch comparison runs it.
  python benchmarks/profile_step.py --config.tiny.unet.remat_policy=full   # Any config field.

Compiles the whole train step as train.py does (`common.compile_step`: text encoder,
conditions, U-Net forward and backward, clipped AdamW, EMA), runs it `--profile_steps` times under
`jax.profiler.trace`, and maps every XLA operation that ran (on the CPU, one thunk per HLO
instruction of the optimised program) back to the JAX code that made it, through the
instruction's `op_name`. Prints, per step:
  - inside the U-Net, forward and backward apart: convolutions, matmuls (plain or fused with
    their elementwise neighbours), normalisation, attention, feed-forward, the rest;
  - outside it, by the op_name's first scopes (text encoder, conditions, loss), and what
    follows the gradients (optimiser, clipping, EMA);
  - the slowest single operations, with their shapes and op_names.
A few operations carry no op_name (XLA's kernel-gradient convolutions and the layout copies
around them): they are counted under "(no op_name)". Checked on the CPU; on a GPU the kernels'
names do not always match the HLO instructions', and unmatched time is reported as such.
"""

import collections
import glob
import gzip
import json
import re
import shutil
import tempfile
import time
from typing import Any

import jax
from absl import flags

from pixeldance_jax.cli import console

import common

_FLAGS: dict[str, Any] = {}

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """{name: {shape, opcode, op_name, matmul}} of the entry computation's instructions; `matmul`
  says whether the instruction is, or fuses, a dot or a convolution."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  found = {}
  for line in entry.splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    op_name = _OP_NAME.search(line)
    called = _CALLS.search(line)
    body = "\n".join(bodies.get(called.group(1), ())) if called else ""
    matmul = opcode in ("dot", "convolution") or " dot(" in body or " convolution(" in body
    found[name] = {"shape": shape, "opcode": opcode, "matmul": matmul,
                   "conv": opcode == "convolution" or " convolution(" in body,
                   "op_name": op_name.group(1) if op_name else ""}
  return found


def kind(info: dict[str, str]) -> str:
  """The table row an operation counts under."""
  op_name = info["op_name"]
  if not op_name:
    return "(no op_name)" + (": convolutions" if info["conv"] else "")
  if "UNet3D" in op_name or ")/unet/" in op_name:
    side = "U-Net backward" if "transpose(" in op_name else "U-Net forward"
    if info["conv"]:
      return f"{side}: convolutions"
    if info["matmul"]:
      return f"{side}: matmuls"
    if re.search(r"norm\d?(_out)?/|_norm/", op_name):
      return f"{side}: normalisation (+ SiLU)"
    if "/attn" in op_name:
      return f"{side}: attention (softmax, reshapes)"
    if "/ff/" in op_name:
      return f"{side}: feed-forward (GELU)"
    return f"{side}: other (residuals, concatenations, up/downsampling, time embedding)"
  scopes = re.sub(r"\d+", "", "/".join(part for part in op_name.split("/")[1:4] if part))
  if "jvp(" not in op_name:  # Not differentiated: after the gradients.
    return "optimiser, clipping, EMA: " + scopes[:70]
  return "outside the U-Net: " + scopes[:70]


def profile(run_step, steps: int) -> dict[str, float]:
  """{operation name: total milliseconds} over `steps` runs of `run_step`, from the profiler."""
  directory = tempfile.mkdtemp(prefix="profile_step_")
  try:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(steps):
        run_step()
    trace_file, = glob.glob(f"{directory}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(trace_file) as f:
      events = json.load(f)["traceEvents"]
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  total = collections.defaultdict(float)
  for event in events:
    if event.get("ph") == "X":
      total[event["name"]] += event["dur"] / 1e3
  return total


def _define_flags() -> dict[str, Any]:
  """This program's flags (defined only when run as a program: tests import this module)."""
  return {
      "run": flags.DEFINE_string("run", "tiny@1x1x1", "CONFIG@MESH, as an item of "
                                 "train_step.py's --runs (CONFIG one of tiny, mid, paper; "
                                 "override its fields as --config.NAME.*)."),
      "profile_steps": flags.DEFINE_integer("profile_steps", 3, "Profiled steps (their mean "
                                            "counts)."),
      "top": flags.DEFINE_integer("top", 25, "Slowest single operations to list.")}


def main(argv) -> None:
  del argv
  import train_step  # pylint: disable=import-outside-toplevel  # Imported by __main__ below.
  common.start_jax(cpu_devices=flags.FLAGS.cpu_devices)
  name, shape = train_step.parse_run(_FLAGS["run"].value)
  config = train_step.resolve_config(name, shape)
  # One program, so that every profiled operation's name is one instruction's (with
  # config.separate_update, the gradients' and the update's programs reuse names).
  config.separate_update = False
  mesh = common.make_mesh(shape)
  print(f"{common.machine_summary()}; {name} on mesh {shape}, batch {config.batch_size}")
  compiled, _, (lower_s, compile_s), _ = common.compile_step(config, mesh)
  print(f"compiled in {lower_s + compile_s:.0f} s")
  known = instructions(compiled.executables["step"].as_text())
  run_step = common.step_runner(config, mesh, compiled)
  run_step()  # Warm-up.
  start = time.perf_counter()
  run_step()
  print(f"one step, unprofiled: {1e3 * (time.perf_counter() - start):.1f} ms")

  steps = _FLAGS["profile_steps"].value
  per_op = {op: ms / steps for op, ms in profile(run_step, steps).items() if op in known}
  by_kind, counts = collections.defaultdict(float), collections.Counter()
  for op, ms in per_op.items():
    by_kind[kind(known[op])] += ms
    counts[kind(known[op])] += 1
  total = sum(by_kind.values())
  print(f"\nXLA operations, per step (mean of {steps} profiled steps): {total:.1f} ms in "
        f"{len(per_op)} operations")
  print(f"{'ms':>9} {'share':>6} {'ops':>5}  kind")
  for row, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
    if ms >= 0.05:
      print(f"{ms:9.2f} {100 * ms / total:5.1f}% {counts[row]:5d}  {row}")
  top = _FLAGS["top"].value
  print(f"\nThe {top} slowest operations:")
  for op, ms in sorted(per_op.items(), key=lambda item: -item[1])[:top]:
    info = known[op]
    print(f"{ms:9.2f} ms  {op[:34]:34s} {info['shape'][:28]:28s} "
          f"{info['op_name'][-90:] or '(no op_name)'}")


if __name__ == "__main__":
  import train_step  # noqa: F401  # pylint: disable=g-import-not-at-top  # Defines its flags.
  _FLAGS.update(_define_flags())
  flags.FLAGS.set_default("cpu_devices", 1)  # One CPU device here.
  console.run(main, reuse_freed_memory=True)
