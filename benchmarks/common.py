"""What the benchmarks share: JAX start-up, named configs, timers, FLOP counts, tables and the
torch reference U-Net.

Every benchmark takes its model config as the `--config` flag (ml_collections), so any field is
overridable on the command line, as with train.py: `--config.data.image_size=128`, or, where a
benchmark runs several named configs, `--config.mid.unet.dtype=bfloat16`. Its own options (runs,
repeats, threads...) are absl flags.
"""

import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence

# `configs/` is not an installed package: put the repository root on the path (once, here).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from configs import pixeldance as paper  # pylint: disable=wrong-import-position
from configs import tiny  # pylint: disable=wrong-import-position
from pixeldance_jax.parallel import mesh as mesh_lib  # pylint: disable=wrong-import-position
from pixeldance_jax.train import state as state_lib  # pylint: disable=wrong-import-position
from pixeldance_jax.train import step as step_lib  # pylint: disable=wrong-import-position
from tests import torch_compat  # noqa: F401  # pylint: disable=wrong-import-position,unused-import

GiB = 2**30


# --- Start-up -------------------------------------------------------------------------------


def start_jax(cpu_devices: int = 1, one_thread: bool = False, platform: str = "") -> None:
  """Settings XLA reads once, when its first backend starts: call before anything touches a
  device (importing jax and the library does not).

  cpu_devices: devices of the CPU platform (fake ones, for meshes on one host). one_thread: XLA's
  CPU runtime on one thread, a steadier figure on a machine other jobs share. platform: e.g.
  "cpu" to stay off an accelerator where nothing runs (abstract shapes only).
  """
  if one_thread:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
  jax.config.update("jax_num_cpu_devices", cpu_devices)
  if platform:
    jax.config.update("jax_platforms", platform)
  if jax.devices()[0].platform == "cpu" and jax.device_count() != cpu_devices:
    raise app.UsageError(f"{jax.device_count()} CPU devices, not {cpu_devices}: leave the "
                         "device count to the benchmark (no --xla_force_host_platform_device_"
                         "count in XLA_FLAGS).")


def cpu_cores() -> int:
  """Cores this process may run on (taskset / cgroup pinning honoured, unlike os.cpu_count)."""
  return len(os.sched_getaffinity(0))


def cpu_model() -> str:
  """"Intel(R) Xeon(R) Processor, AVX-512": the CPU and its widest vector unit, from
  /proc/cpuinfo (the platform's processor string elsewhere). CPU figures and torch / JAX
  ratios differ between CPU models (oneDNN, YNNPACK and Eigen each pick kernels per ISA)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    info = ""
  fields = {key.strip(): value.strip() for key, value in
            (line.split(":", 1) for line in info.splitlines() if ":" in line)}
  flags = set(fields.get("flags", "").split())
  isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON"))
              if flag in flags), "")
  model = fields.get("model name") or platform.processor() or platform.machine()
  return f"{model}, {isa}" if isa else model


def machine_summary(threads: int | None = None) -> str:
  """"device: cpu (cpu; AMD EPYC 7B13, AVX2), 8 device(s), 2 CPU cores, load average 1.3": what
  the figures ran on."""
  device = jax.devices()[0]
  cores = f"{threads} CPU thread(s) of " if threads else ""
  kind = f"{device.device_kind}; {cpu_model()}" if device.platform == "cpu" else device.device_kind
  return (f"device: {device.platform} ({kind}), {jax.device_count()} device(s), "
          f"{cores}{cpu_cores()} CPU cores, load average {os.getloadavg()[0]:.1f}")


# --- Configs --------------------------------------------------------------------------------


def mid_config() -> ml_collections.ConfigDict:
  """Tiny's recipe at 64x64 frames (16x16 latents) with a three-level, wider U-Net."""
  config = tiny.get_config()
  config.data.image_size = 64
  config.unet.block_out_channels = (64, 128, 128)
  config.unet.attention_levels = (False, True, True)
  config.unet.attention_head_dim = 64  # Two heads at every attention level (diffusers: one int).
  config.batch_size = 8
  return config


# configs/tiny.py, the mid size above, configs/pixeldance.py.
CONFIGS = {"tiny": tiny.get_config, "mid": mid_config, "paper": paper.get_config}


def define_named_configs(*names: str, **variants: Callable[[], ml_collections.ConfigDict]
                         ) -> flags.FlagHolder:
  """`--config`: one config per name (`names` from CONFIGS, then `variants`), each field
  overridable as `--config.NAME.unet.dtype=bfloat16`."""
  factories = {name: CONFIGS[name] for name in names} | variants
  configs = ml_collections.ConfigDict({name: make() for name, make in factories.items()})
  return config_flags.DEFINE_config_dict(
      "config", configs, f"Configs {', '.join(factories)}: override fields as "
      "--config.NAME.unet.dtype=bfloat16.")


def parse_mesh(text: str, num_devices: int) -> tuple[int, int, int]:
  """"2x2x2" -> (2, 2, 2), the data x fsdp x tensor sizes; one may be -1: the other devices."""
  sizes = [int(size) for size in text.split("x")]
  if len(sizes) != len(mesh_lib.MESH_AXES):
    raise ValueError(f"mesh {text!r}: give data x fsdp x tensor sizes, e.g. 2x2x2.")
  if -1 not in sizes:  # A mesh on some of the devices is fine: no check against all of them.
    return tuple(sizes)
  return mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, sizes))),
                             num_devices)


def make_mesh(shape: Sequence[int]) -> jax.sharding.Mesh:
  """A data x fsdp x tensor mesh of `shape` on the first prod(shape) devices."""
  sizes = ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape)))
  return mesh_lib.make_mesh(sizes, jax.devices()[:math.prod(shape)])


def batch_shapes(config: ml_collections.ConfigDict, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch in the loader's format: uint8 video `[b, F, H, W, 3]`, tokens `[b, L]`."""
  size, frames = config.data.image_size, config.data.frames
  return {"video": jax.ShapeDtypeStruct((batch, frames, size, size, 3), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((batch, config.text_encoder.max_length), jnp.int32)}


# --- Measuring ------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
  """(fn(*args, **kwargs), wall seconds); `fn` must block until its work is done."""
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def run_seconds(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of each of `repeats` calls of `fn`."""
  return [timed(fn)[1] for _ in range(repeats)]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  return float(np.median(run_seconds(fn, repeats)))


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` runs: on a shared CPU the others measure the neighbours' load."""
  return min(run_seconds(fn, repeats))


def xla_flops(lowered: jax.stages.Lowered) -> float:
  """XLA's FLOP count of a lowered program (global, before SPMD partitioning); custom calls
  count zero, and so does a program of reshapes only."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0]
  return float((analysis or {}).get("flops", 0.0))


def flops_of(fn: Callable[..., Any], *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)` on `args` (arrays or ShapeDtypeStructs); nothing runs."""
  return xla_flops(jax.jit(fn).lower(*args))


# --- Printing -------------------------------------------------------------------------------

# (title, width, format of float cells); a negative width aligns left.
Column = tuple[str, int, str]


def _cell(text: str, width: int) -> str:
  return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"


def header_line(columns: Sequence[Column]) -> str:
  return " ".join(_cell(title, width) for title, width, _ in columns)


def row_line(columns: Sequence[Column], values: Sequence[Any]) -> str:
  """Each value in its column: floats in the column's format, the rest as str()."""
  return " ".join(
      _cell(format(value, spec) if isinstance(value, (float, np.floating)) else str(value), width)
      for (_, width, spec), value in zip(columns, values, strict=True))


# --- torch reference (CPU) --------------------------------------------------------------------
# torch and diffusers are development dependencies: imported only by what uses them.


def set_torch_threads(threads: int) -> None:
  """torch's intra-op threads (0: every core this process may use)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or cpu_cores())


def torch_unet3d(config: ml_collections.ConfigDict, pooled_text: bool = False):
  """diffusers' UNet3DConditionModel laid out as our U-Net (random weights, dropout off).

  diffusers' `attention_head_dim` is the number of heads (diffusers issue 2011), so it gets
  channels / head width, one number for all levels (its transformer_in takes it too). Left
  different: its transformer_in has 8 heads of that many features (ours: transformer_in_heads
  of attention_head_dim); both are small beside the rest. `pooled_text`: a projection of
  `timestep_cond` (pass the pooled text) into the time embedding when the config has our
  pooled-text path (diffusers adds it to the embedding MLP's input, ours to its output).
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  unet = config.unet
  levels = list(zip(unet.block_out_channels, unet.attention_levels))
  heads = {channels // unet.attention_head_dim for channels, attention in levels if attention}
  heads.add(unet.block_out_channels[-1] // unet.attention_head_dim)  # The mid block.
  if len(heads) != 1:
    raise ValueError(f"diffusers' UNet3DConditionModel needs one head count; levels give {heads}.")
  torch.manual_seed(0)
  return diffusers.UNet3DConditionModel(
      sample_size=config.data.image_size // config.autoencoder.patch_size,
      in_channels=2 * config.autoencoder.latent_channels,
      out_channels=config.autoencoder.latent_channels,
      down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for _, a in levels),
      up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for _, a in levels[::-1]),
      block_out_channels=tuple(unet.block_out_channels), layers_per_block=unet.layers_per_block,
      norm_num_groups=unet.norm_num_groups, cross_attention_dim=unet.cross_attention_dim,
      attention_head_dim=heads.pop(),
      time_cond_proj_dim=(unet.cross_attention_dim if pooled_text and unet.pooled_text_embedding
                          else None)).eval()


# --- The train step as train.py runs it -----------------------------------------------------


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A fixed batch in the loader's format (as tests/multi_device_checks.py)."""
  rng = np.random.default_rng(0)
  shapes = batch_shapes(config, config.batch_size)
  return {"video": rng.integers(0, 256, shapes["video"].shape, np.uint8),
          "tokens": rng.integers(0, config.text_encoder.vocab_size, shapes["tokens"].shape,
                                 np.int32)}


def compile_step(config: ml_collections.ConfigDict, mesh):
  """(compiled step as train.py runs it, global FLOPs, (trace + lower s, XLA compile s),
  abstract state)."""
  abstract, shardings = state_lib.abstract_state(config, mesh)
  batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.batch_sharding(mesh))
           for name, x in batch_shapes(config, config.batch_size).items()}
  step = step_lib.jit_train_step(config, mesh, shardings)
  lowered, lower_s = timed(step.lower, abstract, batch, jax.random.key(0))
  compile_s = step.compile(lowered)
  flops = sum(xla_flops(program) for program in lowered.values())
  return step, flops, (lower_s, compile_s), abstract


def planned_bytes(compiled) -> int:
  """XLA's plan of one executable per device: arguments + outputs - donated + temporaries."""
  plan = compiled.memory_analysis()
  return (plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
          + plan.temp_size_in_bytes)


def peak_memory_gib(step: step_lib.CompiledStep, devices, ran: bool) -> tuple[float, str]:
  """(GiB per device, source): the device allocator's high-water mark, else XLA's plan (of the
  largest of the step's programs, which run one after the other)."""
  stats = devices[0].memory_stats() if ran else None
  if stats and "peak_bytes_in_use" in stats:
    return max(d.memory_stats()["peak_bytes_in_use"] for d in devices) / GiB, "dev"
  executables = step.executables.values()
  if any(compiled.memory_analysis() is None for compiled in executables):
    return float("nan"), "n/a"
  return max(planned_bytes(compiled) for compiled in executables) / GiB, "xla"


def step_runner(config: ml_collections.ConfigDict, mesh, step: step_lib.CompiledStep):
  """`run()`: one train step (from random weights, on a synthetic batch), waited for."""
  state = state_lib.create_train_state(config, mesh, jax.random.key(config.seed))
  batch = mesh_lib.global_batch(synthetic_batch(config), mesh)
  rng = jax.random.key(1)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch, rng)
    jax.block_until_ready(metrics["loss"])

  return one_step
