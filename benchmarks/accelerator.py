"""One accelerator measurement per process, printed as one JSON line: a paper-size train step, or
the paper-size sampler. `benchmarks/accelerator.sh` runs a sweep of these, each in its own
process (so one that runs out of memory or crashes does not end the sweep), within a time
budget; read its header first. Everything runs on random weights: nothing is downloaded.

  python benchmarks/accelerator.py --measure=train --remat=none --attention=xla --batch=1
  python benchmarks/accelerator.py --measure=sample --batch=8
  python benchmarks/accelerator.py --plan       # the sweep for this machine (the driver reads it)
  # The same at the unit-test size (configs/unit_test.py), e.g. to check it all on a CPU:
  python benchmarks/accelerator.py --size=unit_test --measure=train --batch=2
  # Compile and count only (XLA's FLOPs and memory plan; nothing materialised), e.g. on a CPU:
  python benchmarks/accelerator.py --measure=train --dry_run

Install: `pip install -e ".[dev,cuda12]"` on an NVIDIA GPU host, `pip install -e ".[dev,tpu]"`
on a TPU VM (the benchmark itself needs only the backend's extra; `[dev]` adds pytest for its
test).

Sizes (--size, default $SIZE, else "paper"):
  paper: configs/pixeldance.py: 16 frames of 256x256 (32x32x4 latents of the KL autoencoder),
    the ~1.5B-parameter 3D U-Net computing in bfloat16 (--dtype; parameters float32), CLIP
    text encoder (frozen), AdamW, EMA. A train step is `step.train_step` as training runs it:
    autoencoder encode, text encoder, conditions, U-Net forward and backward, optimiser, EMA.
  unit_test: configs/unit_test.py (4 frames of 16x16, a 2M-parameter model), compiled at LLVM
    -O0 as the test suite does: every code path, a minute or so a measurement on a CPU; the
    figures mean nothing.

Measurements (--measure):
  train: the train step at --batch clips per device, on --mesh (default "1x-1x1": fully
    sharded data parallel over every local device, as a TPU host needs; on one GPU that is
    1x1x1), with --remat (config.unet.remat_policy) and --attention (config.unet.attention_impl:
    xla, cudnn on GPU, splash on TPU). Compiled ahead of time from the abstract state
    (`common.compile_step`); the state is then drawn at random on the devices by one
    jitted program; one untimed warm-up step, then --timed_steps steps (fewer, at least 2,
    past --timed_seconds), the median counts.
  sample: the whole jitted sampling program (text encoding, --sample_steps DDIM steps with
    classifier-free guidance (a CFG batch of 2 per video), first and last frame conditions
    with tau = half the steps, autoencoder decode to uint8 frames) for --batch videos on one
    device (--mesh default "1x1x1"), as `sample_speed.py` calls it (`generate.generate`). The
    first call (trace, compile, run) is timed, then --sample_repeats runs, the median counts.

Time: a paper-size train measurement is mostly tracing and XLA compiling (expect one to three
minutes on a GPU; the steps take seconds), a sampler measurement its compile and three calls of
50 guided steps. For orientation, from `--dry_run` on a CPU (paper size, batch 1, remat none,
XLA attention): 1528M trainable parameters, 18.5 TFLOP per step, lowering 36 s, an XLA memory
plan of 58 GiB per device (a GPU's plan differs).

Printed on stdout: exactly one JSON line (logs go to stderr); exit code 0 when measured, 1 when
the line records an error (2: a bad command line, no line). Every line has every field below,
in this order; one that does not apply, or is not known on this device, is null. (The lines
the driver writes for a process that died hold only the settings, total_s, error and
error_kind.) Fields:
  measurement       "train" or "sample"
  size              "paper" or "unit_test"
  platform          jax's platform: "gpu", "tpu" or "cpu"
  device_kind       e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"
  devices           devices used (the mesh's size)
  mesh              data x fsdp x tensor, e.g. "1x1x1"
  dtype             U-Net compute dtype
  remat             config.unet.remat_policy (train; the sampler has no backward pass: null)
  attention         config.unet.attention_impl
  batch             train: clips per device; sample: videos per call
  global_batch      train: clips per step over all devices; sample: = batch
  frames, image_size  frames per clip, and their height = width in pixels
  params_m          trainable parameters, millions (U-Net + text encoder)
  lower_s           train: seconds to trace and lower the step
  compile_s         train: XLA compile seconds; sample: first call - median run (trace +
                    compile + transfers)
  first_call_s      sample: seconds of the first call (trace, compile, run)
  init_s            seconds to draw the random state / weights on the devices (incl. compile)
  step_s            train: median seconds per step
  step_times_s      train: every timed step, seconds
  clips_per_s       train: global_batch / step_s
  clips_per_s_per_device  train: clips_per_s / devices
  tflop_per_step    train: XLA's FLOP count of the whole (global) step / 1e12; custom calls
                    (cuDNN and splash attention kernels) count zero
  flops_lower_bound train: true when the step has such kernels (--attention not xla): then
                    tflop_per_step, tflops_per_device and mfu are lower bounds
  tflops_per_device train: tflop_per_step / step_s / devices
  peak_tflops_per_device  the device kind's dense bfloat16 peak from
                    pixeldance_jax/train/throughput.py (null when unknown, e.g. CPU)
  mfu               train: tflops_per_device / peak_tflops_per_device (a fraction)
  loss              train: the last step's loss (random weights: a sanity check only)
  steps             sample: sampler steps (50)
  guidance_scale    sample: classifier-free guidance scale (7.5)
  sampler           sample: "ddim"
  run_s             sample: median seconds of one call of --batch videos
  run_times_s       sample: every timed call, seconds
  seconds_per_video sample: run_s / batch
  videos_per_s      sample: batch / run_s
  peak_memory_gib   peak memory per device, GiB: the device allocator's high-water mark
                    (memory_stats()["peak_bytes_in_use"], the whole process) where the device
                    reports it, else XLA's memory plan of the compiled train step
  memory_source     "device", "xla_plan" or null
  xla_plan_gib      train: XLA's memory plan of the step per device (arguments + outputs -
                    donated aliases + temporaries), GiB
  memory_limit_gib  memory per device, GiB (memory_stats()["bytes_limit"], or
                    --memory_limit_gib): a train step whose XLA plan exceeds it is recorded as
                    out of memory without being run
  jax_version       jax.__version__
  total_s           seconds of the whole process after start-up (imports excluded)
  error             null, or the error's message (first lines); the driver also writes lines
                    with an error for processes that died or timed out without printing
  error_kind        null, "oom" (RESOURCE_EXHAUSTED, or an XLA plan over the limit),
                    "error"; the driver adds "timeout" and "crash"
"""

import json
import math
import os
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from pixeldance_jax.cli import console
from pixeldance_jax.models import pixeldance, unet3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import throughput

import common
from configs import unit_test  # The repository root is on sys.path (common).
from tests import processes

# The fused attention kernels by platform (custom calls: XLA counts their FLOPs as zero).
KERNEL_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}
SIZES = ("paper", "unit_test")
# Largest batch of an open-ended sweep ("train:none:xla:2-"), by size.
MAX_BATCH = {"paper": 64, "unit_test": 2}
GUIDANCE_SCALE = 7.5
# Every line has every field, in this order (null where it does not apply); the header says
# what each holds.
FIELDS = (
    "measurement", "size", "platform", "device_kind", "devices", "mesh", "dtype", "remat",
    "attention", "batch", "global_batch", "frames", "image_size", "params_m", "lower_s",
    "compile_s", "first_call_s", "init_s", "step_s", "step_times_s", "clips_per_s",
    "clips_per_s_per_device", "tflop_per_step", "flops_lower_bound", "tflops_per_device",
    "peak_tflops_per_device", "mfu", "loss", "steps", "guidance_scale", "sampler", "run_s",
    "run_times_s", "seconds_per_video", "videos_per_s", "peak_memory_gib", "memory_source",
    "xla_plan_gib", "memory_limit_gib", "jax_version", "total_s", "error", "error_kind")
PROMPT = "a red square moves quickly to the right"

_MEASURE = flags.DEFINE_enum("measure", "train", ["train", "sample"], "What to measure.")
_SIZE = flags.DEFINE_enum("size", os.environ.get("SIZE", "paper"), list(SIZES),
                          "Model size: the paper config or the unit-test config (default $SIZE).")
_REMAT = flags.DEFINE_enum("remat", "none", list(unet3d.REMAT_POLICIES),
                           "config.unet.remat_policy (train).")
_ATTENTION = flags.DEFINE_enum("attention", "xla", [i for i in unet3d.ATTENTION_IMPLS if i],
                               "config.unet.attention_impl.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "config.unet.dtype (compute dtype).")
_BATCH = flags.DEFINE_integer("batch", 1, "train: clips per device; sample: videos per call.")
_MESH = flags.DEFINE_string("mesh", "", "data x fsdp x tensor (one axis may be -1: the rest of "
                            "the devices); default train 1x-1x1, sample 1x1x1.")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 10, "train: timed steps (the median counts), "
                                    "or fewer (at least 2) once they took --timed_seconds.")
_TIMED_SECONDS = flags.DEFINE_float("timed_seconds", 30.0, "train: seconds of timed steps after "
                                    "which no more are started.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "sample: sampler steps.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 2, "sample: timed calls after the "
                                       "first (the median counts).")
_MEMORY_LIMIT = flags.DEFINE_float("memory_limit_gib", 0.0, "Memory per device to plan "
                                   "against; 0: the device's own limit where it reports one.")
# Every field of either size is overridable as for the other benchmarks:
# --config.paper.data.frames=8, --config.unit_test.unet.block_out_channels="(16,)".
_CONFIG = common.define_named_configs("paper", unit_test=unit_test.get_config)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "train: compile and count only (FLOPs, XLA's "
                             "memory plan); nothing is materialised or run.")
_PLAN = flags.DEFINE_bool("plan", False, "Print the sweep (--order) for this machine, one "
                          "measurement a line: SETTING<TAB>FLAGS<TAB>JSON of its settings.")
_ORDER = flags.DEFINE_string(
    "order", os.environ.get("ORDER", ""), "The sweep, run in this order (default $ORDER, else "
    "this platform's default, see `default_order`): comma-separated items "
    "train:REMAT:ATTENTION:BATCHES or sample:ATTENTION:BATCHES; BATCHES is one batch (4), "
    "several (1/2/4) or a doubling sweep up to --max_batch (2-). ATTENTION 'kernel' is the "
    "platform's fused kernel (cudnn on GPU, splash on TPU, xla elsewhere).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", int(os.environ.get("MAX_BATCH", "0")),
                                  "Largest batch of a doubling sweep (default $MAX_BATCH, else "
                                  f"by size: {MAX_BATCH}).")


class OutOfMemory(RuntimeError):
  """A program that cannot fit in the device's memory."""


# --- The sweep ------------------------------------------------------------------------------


def default_order(platform: str) -> str:
  """The most informative results first, for a budget that fits only the first few (each
  paper-size train measurement is one compile, about a minute or two on a GPU): remat none at
  batch 1 with XLA's attention, the sampler at batch 1, the fused attention kernel at batch 1,
  the sampler at batch 8, then the batch sweeps (up to the first failure) of remat none, and of
  the remat policies with the fused kernel."""
  kernel = KERNEL_ATTENTION.get(platform)
  fast = kernel or "xla"
  items = ["train:none:xla:1", "sample:xla:1"]
  items += [f"train:none:{kernel}:1"] if kernel else []
  items += ["sample:xla:8", "train:none:xla:2-"]
  items += [f"train:none:{kernel}:2-"] if kernel else []
  items += [f"train:dots_saveable:{fast}:1-", f"train:nothing_saveable:{fast}:1-"]
  return ",".join(items)


def _batches(text: str, max_batch: int) -> list[int]:
  """"4" -> [4]; "1/2/4" -> [1, 2, 4]; "2-" -> [2, 4, 8, ...] up to `max_batch`."""
  try:
    if text.endswith("-"):
      start = int(text[:-1] or 1)
      return [start * 2**i for i in range(64) if start * 2**i <= max_batch]
    return [int(batch) for batch in text.split("/")]
  except ValueError as error:
    raise app.UsageError(f"--order: batches {text!r} are not 4, 1/2/4 or 2-.") from error


def plan(order: str, platform: str, max_batch: int) -> list[tuple[str, str, dict[str, Any]]]:
  """(setting, flags, settings) per measurement of `order`, in order, without repeats. A
  setting's batches are tried in this order; the driver skips the rest after a failure."""
  kernel = KERNEL_ATTENTION.get(platform, "xla")
  rows, seen = [], set()
  for item in filter(None, (item.strip() for item in order.split(","))):
    fields = item.split(":")
    kind = fields[0]
    if kind not in ("train", "sample") or len(fields) != (4 if kind == "train" else 3):
      raise app.UsageError(f"--order item {item!r}: expected train:REMAT:ATTENTION:BATCHES "
                           "or sample:ATTENTION:BATCHES.")
    remat, attention = (fields[1], fields[2]) if kind == "train" else (None, fields[1])
    attention = kernel if attention == "kernel" else attention
    if remat is not None and remat not in unet3d.REMAT_POLICIES:
      raise app.UsageError(f"--order item {item!r}: remat {remat!r} is not one of "
                           f"{unet3d.REMAT_POLICIES}.")
    if attention not in unet3d.ATTENTION_IMPLS:
      raise app.UsageError(f"--order item {item!r}: attention {attention!r} is not one of "
                           f"{[i for i in unet3d.ATTENTION_IMPLS if i]}.")
    setting = ":".join(filter(None, (kind, remat, attention)))
    for batch in _batches(fields[-1], max_batch):
      if (setting, batch) in seen:
        continue
      seen.add((setting, batch))
      arguments = [f"--measure={kind}", f"--attention={attention}", f"--batch={batch}"]
      arguments += [f"--remat={remat}"] if remat else []
      rows.append((setting, " ".join(arguments),
                   {"measurement": kind, "remat": remat, "attention": attention,
                    "batch": batch}))
  return rows


# --- Measuring ------------------------------------------------------------------------------


def make_config(measure: str) -> ml_collections.ConfigDict:
  config = _CONFIG.value[_SIZE.value].copy_and_resolve_references()
  config.unet.dtype = _DTYPE.value
  config.unet.attention_impl = _ATTENTION.value
  config.unet.remat_policy = _REMAT.value
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = common.parse_mesh(
      _MESH.value or ("1x-1x1" if measure == "train" else "1x1x1"), jax.device_count())
  return config


def _draw(tree: Any, noise: jax.Array, salt: int) -> Any:
  """Arrays of `tree`'s shapes from `noise` (inside a jitted function): floating leaves are
  slices of it at leaf- and `salt`-dependent offsets, scaled by 1 / sqrt(fan-in) (norm scales
  1 + 0.05 noise, as tests/helpers.random_params), other leaves zero. One random draw for all
  the leaves: a draw per leaf makes a program that compiles for minutes."""
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for index, (path, leaf) in enumerate(paths_and_leaves):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
      continue
    start = 7919 * (index + 1) * (salt + 1) % (noise.size - leaf.size + 1)
    values = noise[start:start + leaf.size].reshape(leaf.shape).astype(leaf.dtype)
    if getattr(path[-1], "key", None) == "scale":  # Norms.
      leaves.append(1.0 + 0.05 * values)
    else:
      fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 20.0
      leaves.append(values / math.sqrt(fan_in))
  return jax.tree.unflatten(treedef, leaves)


def _on_devices(draw, abstract: Any) -> Any:
  """`draw(noise)` jitted onto `abstract`'s shardings, `noise` a standard normal vector as long
  as the largest leaf: drawn in place on the devices, never on the host or on one device
  first."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  length = max((x.size for x in jax.tree.leaves(abstract)), default=1)
  return jax.block_until_ready(jax.jit(
      lambda rng: draw(jax.random.normal(rng, (length,), jnp.float32)),
      out_shardings=shardings)(jax.random.key(0)))


def random_state(abstract: state_lib.TrainState) -> state_lib.TrainState:
  """A train state of `abstract`'s shapes and shardings: random weights; the EMA, the
  optimiser's moments and the step zero (what the step computes with them takes the same
  time, and zeros compile in a moment)."""
  def draw(noise):
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
    return abstract.replace(step=zeros(abstract.step), params=_draw(abstract.params, noise, 0),
                            ema_params=zeros(abstract.ema_params),
                            opt_state=zeros(abstract.opt_state),
                            frozen=_draw(abstract.frozen, noise, 1))
  return _on_devices(draw, abstract)


def memory_limit_gib(device: jax.Device) -> float | None:
  if _MEMORY_LIMIT.value > 0:
    return _MEMORY_LIMIT.value
  stats = device.memory_stats()
  return stats["bytes_limit"] / common.GiB if stats and "bytes_limit" in stats else None


def device_peak_gib(devices) -> float | None:
  """The allocator's high-water mark of this process, GiB, the largest over `devices`."""
  stats = [d.memory_stats() for d in devices]
  if not all(s and "peak_bytes_in_use" in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats) / common.GiB


def measure_train(config: ml_collections.ConfigDict, mesh, devices, record: dict) -> None:
  """Compiles, then (unless --dry_run) runs the train step; fills `record`."""
  config.batch_size = _BATCH.value * mesh.shape["data"] * mesh.shape["fsdp"]
  record["global_batch"] = config.batch_size
  compiled, flops, (lower_s, compile_s), abstract = common.compile_step(config, mesh)
  plan_gib, _ = common.peak_memory_gib(compiled, devices, ran=False)
  plan_gib = None if math.isnan(plan_gib) else plan_gib
  peak = throughput.peak_flops_per_device(devices[0], config.peak_flops_per_device)
  record.update(
      params_m=state_lib.count_params(abstract.params) / 1e6, lower_s=lower_s,
      compile_s=compile_s, tflop_per_step=flops / 1e12,
      flops_lower_bound=_ATTENTION.value != "xla", peak_tflops_per_device=peak / 1e12 or None,
      xla_plan_gib=plan_gib, peak_memory_gib=plan_gib, memory_source="xla_plan")
  logging.info("train step compiled in %.1f s (lowered in %.1f s): %.2f TFLOP, XLA plan "
               "%s GiB per device", compile_s, lower_s, flops / 1e12,
               "?" if plan_gib is None else f"{plan_gib:.2f}")
  limit = record["memory_limit_gib"]
  if limit and plan_gib and plan_gib > limit:
    raise OutOfMemory(f"XLA's memory plan of the step, {plan_gib:.2f} GiB per device, exceeds "
                      f"the device's {limit:.2f} GiB: not run.")
  if _DRY_RUN.value:
    return
  state, record["init_s"] = common.timed(random_state, abstract)
  batch = mesh_lib.global_batch(common.synthetic_batch(config), mesh)
  rng = jax.random.key(1)
  holder = {"state": state}

  def one_step():
    holder["state"], holder["metrics"] = jax.block_until_ready(
        compiled(holder["state"], batch, rng))

  one_step()  # Warm-up: first-run allocations, autotuning.
  times = []
  while len(times) < _TIMED_STEPS.value and (len(times) < 2 or
                                             sum(times) < _TIMED_SECONDS.value):
    times.append(common.timed(one_step)[1])
  step_s = float(np.median(times))
  flops_per_s = flops / step_s / len(devices)
  record.update(step_s=step_s, step_times_s=times, clips_per_s=config.batch_size / step_s,
                clips_per_s_per_device=config.batch_size / step_s / len(devices),
                tflops_per_device=flops_per_s / 1e12, mfu=flops_per_s / peak if peak else None,
                loss=float(holder["metrics"]["loss"]))
  peak_gib = device_peak_gib(devices)
  if peak_gib is not None:
    record.update(peak_memory_gib=peak_gib, memory_source="device")


def measure_sample(config: ml_collections.ConfigDict, mesh, devices, record: dict) -> None:
  """Random weights drawn on the devices, then the sampling program's first call and repeats."""
  if _DRY_RUN.value:
    raise app.UsageError("--dry_run is for --measure=train.")
  batch, steps = _BATCH.value, _SAMPLE_STEPS.value
  record.update(remat=None, global_batch=batch, steps=steps, guidance_scale=GUIDANCE_SCALE,
                sampler=config.sample.sampler)
  abstract_params, abstract_frozen = pixeldance.abstract_weights(config, mesh)
  record["params_m"] = state_lib.count_params(abstract_params) / 1e6

  def draw(noise):
    return _draw(abstract_params, noise, 0), _draw(abstract_frozen, noise, 1)
  (params, frozen), record["init_s"] = common.timed(
      _on_devices, draw, (abstract_params, abstract_frozen))
  pipeline = sampling_pipeline.make_pipeline(config, params, frozen, mesh, weights="random")
  size = config.data.image_size
  frames = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

  def sample():
    return generate_lib.generate(pipeline, [PROMPT] * batch, frames, frames[::-1].copy(),
                                 tau=steps // 2, steps=steps, guidance_scale=GUIDANCE_SCALE)

  _, first_call_s = common.timed(sample)
  logging.info("sampler's first call (trace, compile, run): %.1f s", first_call_s)
  times = common.run_seconds(sample, _SAMPLE_REPEATS.value)
  run_s = float(np.median(times))
  record.update(first_call_s=first_call_s, compile_s=first_call_s - run_s, run_s=run_s,
                run_times_s=times, seconds_per_video=run_s / batch, videos_per_s=batch / run_s)
  peak_gib = device_peak_gib(devices)
  if peak_gib is not None:
    record.update(peak_memory_gib=peak_gib, memory_source="device")


def _error_kind(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}"
  oom = isinstance(error, OutOfMemory) or any(
      marker in text for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
  return "oom" if oom else "error"


def _json_value(value: Any) -> Any:
  """NaN and inf as null (JSON has neither); numpy scalars as Python numbers."""
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def measure() -> int:
  """Measures --measure, prints its JSON line; 0 when measured, 1 when the line is an error."""
  start = time.perf_counter()
  config = make_config(_MEASURE.value)
  shape = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  devices = jax.devices()[:math.prod(shape)]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  record = dict.fromkeys(FIELDS)
  record.update({
      "measurement": _MEASURE.value, "size": _SIZE.value, "platform": devices[0].platform,
      "device_kind": devices[0].device_kind, "devices": len(devices),
      "mesh": "x".join(map(str, shape)), "dtype": config.unet.dtype,
      "remat": config.unet.remat_policy, "attention": config.unet.attention_impl,
      "batch": _BATCH.value, "frames": config.data.frames,
      "image_size": config.data.image_size, "memory_limit_gib": memory_limit_gib(devices[0]),
      "jax_version": jax.__version__})
  logging.info("%s", common.machine_summary())
  try:
    (measure_train if _MEASURE.value == "train" else measure_sample)(config, mesh, devices,
                                                                     record)
    record.update(error=None, error_kind=None)
  except app.UsageError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # Recorded, as the driver's are.
    logging.error("%s", error if isinstance(error, OutOfMemory) else traceback.format_exc())
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    record.update(error=" | ".join(lines[:3])[:1000], error_kind=_error_kind(error))
  record["total_s"] = time.perf_counter() - start
  if list(record) != list(FIELDS):  # A field set by mistake (misspelt): fail loudly.
    raise AssertionError(f"fields not in FIELDS: {sorted(set(record) - set(FIELDS))}")
  print(json.dumps({key: _json_value(value) for key, value in record.items()}), flush=True)
  return 0 if record["error"] is None else 1


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _SIZE.value == "unit_test":  # Compiled as the test suite does (conftest.py).
    os.environ["XLA_FLAGS"] = processes.with_fast_compile(os.environ.get("XLA_FLAGS", ""))
  common.start_jax(cpu_devices=1)
  platform = jax.devices()[0].platform
  if platform == "cpu" and _SIZE.value == "paper" and not _DRY_RUN.value:
    raise app.UsageError("The paper size runs on a GPU or TPU (hours on a CPU): on a CPU give "
                         "--size=unit_test (SIZE=unit_test), or --dry_run to compile only.")
  if not _PLAN.value:
    sys.exit(measure())
  rows = plan(_ORDER.value or default_order(platform), platform,
              _MAX_BATCH.value or MAX_BATCH[_SIZE.value])
  for setting, arguments, settings in rows:
    if not (_DRY_RUN.value and settings["measurement"] == "sample"):  # Train only.
      print(f"{setting}\t{arguments}\t{json.dumps(dict(settings, size=_SIZE.value))}")


if __name__ == "__main__":
  console.run(main)
