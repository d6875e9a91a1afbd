"""Train-step speed: compile time, step time, peak memory, FLOPs and MFU, across meshes.

  python benchmarks/train_step.py [--runs=tiny@1x1x1,mid@2x2x2] [--steps=3]
      [--cpu_devices=8] [--torch_configs=tiny] [--torch_threads=0,1] [--notorch]
      [--batch_size=0] [--dtype=] [--set=unet.remat_policy=full]
  # More meshes on 8 fake CPU devices (each mesh is one more compile, ~1 min on 2 cores):
  python benchmarks/train_step.py --runs=tiny@1x1x1,tiny@8x1x1,tiny@2x4x1,tiny@2x2x2,mid@1x1x1
  # On an accelerator host, the paper-size config (bfloat16 U-Net, one clip per device), e.g.
  # one H100 (add --set=unet.attention_impl=cudnn, --set=unet.remat_policy=... to try them):
  python benchmarks/train_step.py --runs=paper@1x1x1 --steps=5
  # Anywhere, compile only (abstract weights, nothing materialised): FLOPs and XLA's memory plan.
  python benchmarks/train_step.py --runs=paper@1x1x1 --compile_only --notorch

Measured per (config, mesh), with synthetic batches in the loader's format (uint8 video, token
ids) and random weights:
  - lower s, compile s: trace + lower, then XLA compile, of the whole `step.train_step` (text
    encoder forward and backward, autoencoder encode, conditions, U-Net forward and backward,
    AdamW with clipping, EMA), jitted exactly as `step.jit_train_step` does (state donated, same
    shardings), but from the abstract state, so the paper config compiles without its weights.
  - step s: median of --steps timed steps after one untimed warm-up step; clips/s from it.
  - TFLOP/step: XLA's cost analysis of the lowered (global, before SPMD partitioning) program;
    remat recomputation, when configured, is included; custom calls (cuDNN or splash
    attention kernels) count zero, so with those the figure is a lower bound. TFLOP/s is per
    device.
  - MFU: per-device TFLOP/s over the device kind's dense peak (PEAK_TFLOPS) at the U-Net compute
    dtype: bfloat16 peak for 16-bit, TF32 peak for float32 on NVIDIA (XLA's default float32
    matmul precision there), bfloat16 peak on TPU (one bf16 pass at default precision). CPU:
    no peak is known, "n/a". --peak_tflops overrides the table.
  - GiB/dev: on GPU/TPU `device.memory_stats()["peak_bytes_in_use"]` ("dev"), the process's
    high-water mark, so list runs in increasing size; elsewhere, and with --compile_only, XLA's
    memory plan of the compiled step ("xla": arguments + outputs - donated aliases +
    temporaries), per device.
On CPU (--torch), per --torch_configs config, one device: the diffusers PyTorch
`UNet3DConditionModel` of the same layout, latent size, frames and batch (forward + backward +
AdamW step, MSE on random latents, float32), against (a) a JAX step of the same kind: our U-Net
alone, MSE on the same random latents, optax AdamW (apples to apples), and (b) the full JAX step
above (which does more: text encoder, autoencoder encode, conditioning, clipping, EMA). The
steps alternate, JAX then torch, in one process, so machine load hits both alike; ratios are
torch seconds / JAX seconds (> 1: JAX faster). torch is timed at each --torch_threads count:
at as many threads as cores its OpenMP workers spin and stall when other processes share the
cores (measured on a loaded 2-core machine: ~0.5-0.8 s per tiny step at 1 thread, 2-10 s at 2),
so one thread is the fairer figure there. JAX runs with XLA's default CPU thread pool.
"""

import os
import pathlib
import sys


def _cpu_devices_from_argv(default: int = 8) -> int:
  """--cpu_devices must act before jax is imported, so it is read from argv here."""
  for arg in sys.argv[1:]:
    if arg.startswith("--cpu_devices="):
      return int(arg.split("=", 1)[1])
  return default


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           f"device_count={_cpu_devices_from_argv()}").strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ast  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from configs import pixeldance as paper_config
from configs import tiny
from pixeldance_jax.models import unet3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

import torch_reference  # pylint: disable=wrong-import-position

_RUNS = flags.DEFINE_list("runs", ["tiny@1x1x1", "mid@2x2x2"], "CONFIG@MESH "
                          "items, run in this order: CONFIG a name in CONFIGS, MESH data x fsdp "
                          "x tensor (one axis may be -1: all remaining devices).")
_TORCH_CONFIGS = flags.DEFINE_list("torch_configs", ["tiny"], "Configs compared with torch.")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["0", "1"], "torch intra-op thread counts "
                                   "to time, each against the same JAX steps; 0: CPU cores.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per measurement (the median counts).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "Fake CPU devices (read before jax "
                                    "starts; no effect on GPU/TPU devices).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Global batch; 0: the config's default.")
_DTYPE = flags.DEFINE_string("dtype", "", "U-Net compute dtype for every config; empty: the "
                             "config's (bfloat16 for paper).")
_SET = flags.DEFINE_multi_string("set", [], "Config override key=value for every config, e.g. "
                                 "--set=unet.remat_policy=full --set=unet.attention_impl=cudnn.")
_TORCH = flags.DEFINE_bool("torch", True, "On CPU, the diffusers U-Net step beside ours.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile and count, run nothing.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak for MFU; 0: the table.")

GiB = 2**30
# Dense peak TFLOP/s per chip: (16-bit, float32 as XLA runs it by default). First match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),  # SXM; float32 runs as TF32.
    ("H200", (989.0, 494.0)),
    ("A100", (312.0, 156.0)),
    ("TPU v4", (275.0, 275.0)),  # TPU float32 matmuls: one bf16 pass at default precision.
    ("TPU v5 lite", (197.0, 197.0)),  # v5e
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5", (459.0, 459.0)),  # v5p
    ("TPU v6 lite", (918.0, 918.0)),  # v6e (Trillium)
    ("TPU v6e", (918.0, 918.0)),
)


def mid_config() -> ml_collections.ConfigDict:
  """Tiny's recipe at 64x64 frames (16x16 latents) with a three-level, wider U-Net."""
  config = tiny.get_config()
  config.data.image_size = 64
  config.unet.block_out_channels = (64, 128, 128)
  config.unet.attention_levels = (False, True, True)
  config.unet.attention_head_dim = 64  # Two heads at every attention level (diffusers: one int).
  config.batch_size = 8
  return config


def paper_bf16_config() -> ml_collections.ConfigDict:
  """The paper config with a bfloat16 U-Net and one clip per device (it must fit one chip)."""
  config = paper_config.get_config()
  config.unet.dtype = "bfloat16"
  config.batch_size = 0  # Resolved to the data-parallel device count in `resolve_config`.
  return config


CONFIGS = {"tiny": tiny.get_config, "mid": mid_config, "paper": paper_bf16_config}


def parse_run(item: str) -> tuple[str, tuple[int, int, int]]:
  """"tiny@2x2x2" -> ("tiny", (2, 2, 2)); a -1 axis takes the remaining devices."""
  name, _, mesh_text = item.partition("@")
  if name not in CONFIGS:
    raise app.UsageError(f"--runs item {item!r}: config {name!r} is not one of {list(CONFIGS)}.")
  sizes = [int(size) for size in (mesh_text or "1x1x1").split("x")]
  if len(sizes) != len(mesh_lib.MESH_AXES):
    raise app.UsageError(f"--runs item {item!r}: the mesh needs data x fsdp x tensor sizes.")
  mesh_config = ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, sizes)))
  if -1 in sizes:
    return name, mesh_lib.mesh_shape(mesh_config, jax.device_count())
  return name, tuple(sizes)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """`key.sub=value` assignments; an unknown key or a wrong type raises, as config_flags does."""
  for override in overrides:
    key, _, text = override.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # A bare string such as full or cudnn.
    *parents, leaf = key.split(".")
    node = functools.reduce(lambda c, name: c[name], parents, config)
    if leaf not in node:
      raise KeyError(f"--set={override}: the config has no field {key!r}.")
    node[leaf] = value


def resolve_config(name: str, shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
  config = CONFIGS[name]()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  if _DTYPE.value:
    config.unet.dtype = _DTYPE.value
  apply_overrides(config, _SET.value)
  config.batch_size = _BATCH_SIZE.value or config.batch_size or shape[0] * shape[1]
  return config


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A fixed batch in the loader's format (as tests/multi_device_checks.py)."""
  rng = np.random.default_rng(0)
  size, frames = config.data.image_size, config.data.frames
  return {"video": rng.integers(0, 256, (config.batch_size, frames, size, size, 3), np.uint8),
          "tokens": rng.integers(0, config.text_encoder.vocab_size,
                                 (config.batch_size, config.text_encoder.max_length), np.int32)}


def jit_step(config: ml_collections.ConfigDict, mesh, shardings):
  """`step_lib.train_step` jitted as `step_lib.jit_train_step` does, unwrapped to lower it."""
  rules = sharding.logical_rules(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def step_in_mesh(state, batch, rng):
    with nn.logical_axis_rules(rules):
      return step_lib.train_step(state, batch, rng, config)

  return jax.jit(step_in_mesh, donate_argnums=0,
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh), replicated),
                 out_shardings=(shardings, replicated))


def compile_step(config: ml_collections.ConfigDict, mesh):
  """(compiled step, global FLOPs, (trace + lower s, XLA compile s), abstract state)."""
  abstract, shardings = state_lib.abstract_state(config, mesh)
  batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.batch_sharding(mesh))
           for name, x in synthetic_batch_shapes(config).items()}
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = jit_step(config, mesh, shardings).lower(abstract, batch, jax.random.key(0))
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  seconds = (lowered_at - start, time.perf_counter() - lowered_at)
  return compiled, _flops(lowered), seconds, abstract


def synthetic_batch_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  size, frames, batch = config.data.image_size, config.data.frames, config.batch_size
  return {"video": jax.ShapeDtypeStruct((batch, frames, size, size, 3), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((batch, config.text_encoder.max_length), jnp.int32)}


def _flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0]
  return float((analysis or {}).get("flops", float("nan")))


def peak_memory_gib(compiled, devices, ran: bool) -> tuple[float, str]:
  """(GiB per device, source): the device allocator's high-water mark, else XLA's plan."""
  stats = devices[0].memory_stats() if ran else None
  if stats and "peak_bytes_in_use" in stats:
    return max(d.memory_stats()["peak_bytes_in_use"] for d in devices) / GiB, "dev"
  plan = compiled.memory_analysis()
  if plan is None:
    return float("nan"), "n/a"
  planned = (plan.argument_size_in_bytes + plan.output_size_in_bytes - plan.alias_size_in_bytes
             + plan.temp_size_in_bytes)
  return planned / GiB, "xla"


def peak_tflops(device, dtype: str) -> float | None:
  """Dense peak TFLOP/s of one device at the compute dtype; None where unknown (CPU)."""
  if _PEAK_TFLOPS.value:
    return _PEAK_TFLOPS.value
  for kind, (half, single) in PEAK_TFLOPS:
    if kind.lower() in device.device_kind.lower():
      return half if jnp.dtype(dtype).itemsize == 2 else single
  return None


def median_step_seconds(step_fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step_fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(name: str, shape: tuple[int, int, int]) -> dict:
  """One row of the table: compile, run --steps steps (unless --compile_only), count."""
  config = resolve_config(name, shape)
  devices = jax.devices()[:math.prod(shape)]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  compiled, flops, compile_s, abstract = compile_step(config, mesh)
  row = {"config": name, "mesh": "x".join(map(str, shape)), "dtype": config.unet.dtype,
         "batch": config.batch_size, "params": state_lib.count_params(abstract.params),
         "lower_s": compile_s[0], "compile_s": compile_s[1], "flops": flops, "step_s": float("nan")}
  if not _COMPILE_ONLY.value:
    state = state_lib.create_train_state(config, mesh, jax.random.key(config.seed))
    batch = mesh_lib.global_batch(synthetic_batch(config), mesh)
    rng = jax.random.key(1)
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      jax.block_until_ready(metrics["loss"])

    one_step()  # Warm-up: first-run allocations, autotuning.
    row["step_s"] = median_step_seconds(one_step, _STEPS.value)
    del holder
  ran = not _COMPILE_ONLY.value
  row["memory_gib"], row["memory_source"] = peak_memory_gib(compiled, devices, ran)
  peak = peak_tflops(devices[0], config.unet.dtype)
  row["tflops_per_device"] = flops / row["step_s"] / len(devices) / 1e12
  row["mfu"] = row["tflops_per_device"] / peak if peak else None
  return row


def format_row(row: dict) -> str:
  mfu = "n/a" if row["mfu"] is None or math.isnan(row["mfu"]) else f"{100 * row['mfu']:.1f}%"
  return (f"{row['config']:>6} {row['mesh']:>7} {row['dtype']:>9} {row['batch']:>5} "
          f"{row['params'] / 1e6:>8.1f}M {row['lower_s']:>7.1f} {row['compile_s']:>9.1f} "
          f"{row['step_s']:>8.3f} "
          f"{row['batch'] / row['step_s']:>8.2f} {row['flops'] / 1e12:>10.4f} "
          f"{row['tflops_per_device']:>9.4f} {mfu:>6} "
          f"{row['memory_gib']:>7.3f} {row['memory_source']}")


HEADER = (f"{'config':>6} {'mesh':>7} {'dtype':>9} {'batch':>5} {'params':>9} {'lower s':>7} "
          f"{'compile s':>9} "
          f"{'step s':>8} {'clips/s':>8} {'TFLOP/step':>10} {'TFLOP/s/d':>9} {'MFU':>6} "
          f"{'GiB/dev':>7} src")


# --- U-Net only, JAX and PyTorch, on CPU --------------------------------------------------


def unet_inputs(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random U-Net inputs in our layout: `[batch, frames, height, width, channels]`."""
  rng = np.random.default_rng(seed)
  size = config.data.image_size // config.autoencoder.patch_size
  channels = config.autoencoder.latent_channels
  shape = (config.batch_size, config.data.frames, size, size, channels)
  return {"model_input": rng.standard_normal(shape[:-1] + (2 * channels,), np.float32),
          "target": rng.standard_normal(shape, np.float32),
          "timesteps": rng.integers(0, config.diffusion.num_train_timesteps,
                                    (config.batch_size,), np.int32),
          "context": rng.standard_normal((config.batch_size, config.text_encoder.max_length,
                                          config.unet.cross_attention_dim), np.float32)}


def jax_unet_step(config: ml_collections.ConfigDict):
  """A U-Net-only AdamW step on one device, `run()` -> loss; the same work as the torch step."""
  spec = unet3d.UNetSpec.from_config(config)
  model = unet3d.UNet3D(spec)
  tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  rules = sharding.logical_rules(config)

  def loss_fn(params, inputs):
    prediction = model.apply({"params": params}, inputs["model_input"], inputs["timesteps"],
                             inputs["context"], True, True)
    return jnp.mean(jnp.square(prediction - inputs["target"]))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, inputs):
    with nn.logical_axis_rules(rules):
      loss, grads = jax.value_and_grad(loss_fn)(params, inputs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Placed on the mesh as the step returns them, so the second call does not compile again.
  on_mesh = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  params = jax.jit(lambda rng: nn.meta.unbox(unet3d.init_params(spec, rng)))(jax.random.key(0))
  params = on_mesh(params)
  holder = {"params": params, "opt_state": on_mesh(tx.init(params))}
  inputs = on_mesh(unet_inputs(config))

  def run():
    with jax.set_mesh(mesh):
      holder["params"], holder["opt_state"], loss = step(holder["params"], holder["opt_state"],
                                                         inputs)
    return float(loss)

  return run, state_lib.count_params(params)


def torch_unet_step(config: ml_collections.ConfigDict):
  """forward + backward + AdamW step of the diffusers U-Net, `run()` -> loss."""
  import torch  # pylint: disable=g-import-not-at-top
  # eval(): dropout off, as in our step (the tiny and mid configs set no dropout); autograd
  # is unaffected (diffusers' U-Net has no batch norm).
  model = torch_reference.torch_unet3d(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                weight_decay=config.weight_decay)
  # Ours [b, f, h, w, c] -> diffusers [b, c, f, h, w].
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  inputs = unet_inputs(config)
  model_input, target = to_torch(inputs["model_input"]), to_torch(inputs["target"])
  timesteps = torch.from_numpy(inputs["timesteps"]).long()
  context = torch.from_numpy(inputs["context"])

  def run():
    optimizer.zero_grad(set_to_none=True)
    prediction = model(model_input, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(prediction, target)
    loss.backward()
    optimizer.step()
    return loss.item()

  return run, sum(p.numel() for p in model.parameters())


def timed_torch(torch_run, threads: int):
  """`torch_run` at `threads` intra-op threads, as a no-argument function for the timer."""
  import torch  # pylint: disable=g-import-not-at-top

  def run():
    torch.set_num_threads(threads)
    return torch_run()

  return run


def compare_with_torch(name: str, full_step_s: float | None, cores: int) -> None:
  """Alternating JAX / torch U-Net-only steps on one device; prints seconds and ratios."""
  config = resolve_config(name, (1, 1, 1))
  jax_run, jax_params = jax_unet_step(config)
  torch_run, torch_params = torch_unet_step(config)
  threads = [int(t) or cores for t in _TORCH_THREADS.value]
  runs = {"jax": jax_run} | {t: timed_torch(torch_run, t) for t in threads}
  for run in runs.values():
    run()  # Warm-up (JAX: compile; torch: allocator, oneDNN primitives).
  times = {key: [] for key in runs}
  for _ in range(_STEPS.value):
    for key, run in runs.items():
      times[key].append(median_step_seconds(run, 1))
  median = {key: float(np.median(values)) for key, values in times.items()}
  size = config.data.image_size // config.autoencoder.patch_size
  print(f"  {name}: latents {config.batch_size}x{config.data.frames}x{size}x{size}x"
        f"{2 * config.autoencoder.latent_channels}->{config.autoencoder.latent_channels}, "
        f"U-Net params JAX {jax_params / 1e6:.2f}M / torch {torch_params / 1e6:.2f}M")
  print(f"    JAX U-Net-only step {median['jax']:.3f} s"
        + (f"; JAX full step (1x1x1 row) {full_step_s:.3f} s" if full_step_s else ""))
  for t in threads:
    line = (f"    torch, {t} thread(s): {median[t]:.3f} s -> torch / JAX U-Net-only = "
            f"{median[t] / median['jax']:.2f}x")
    if full_step_s:
      line += f", torch U-Net-only / JAX full step = {median[t] / full_step_s:.2f}x"
    print(line)


def main(argv) -> None:
  del argv
  start = time.perf_counter()
  device = jax.devices()[0]
  cores = len(os.sched_getaffinity(0))
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s), "
        f"{cores} CPU cores; median of {_STEPS.value} steps after one warm-up"
        f"{'; compile only' if _COMPILE_ONLY.value else ''}")
  if device.platform == "cpu" and jax.device_count() != _CPU_DEVICES.value:
    raise app.UsageError(f"{jax.device_count()} CPU devices, not --cpu_devices="
                         f"{_CPU_DEVICES.value}: write the flag as --cpu_devices=N (one token), "
                         "it is read before jax starts.")
  runs = [parse_run(item) for item in _RUNS.value]
  if device.platform == "cpu" and not _COMPILE_ONLY.value and any(
      name == "paper" for name, _ in runs):
    raise app.UsageError("The paper config runs on a GPU/TPU; on CPU add --compile_only.")
  print(HEADER)
  rows = []
  for name, shape in runs:
    rows.append(measure(name, shape))
    print(format_row(rows[-1]), flush=True)
  if _TORCH.value and device.platform == "cpu" and not _COMPILE_ONLY.value:
    import torch  # pylint: disable=g-import-not-at-top
    print("\nOn one CPU device, alternating steps: diffusers UNet3DConditionModel (PyTorch "
          f"{torch.__version__}, float32) vs our U-Net alone (same inputs, AdamW, MSE):")
    for name in _TORCH_CONFIGS.value:
      full = [r["step_s"] for r in rows if r["config"] == name and r["mesh"] == "1x1x1"]
      compare_with_torch(name, full[0] if full else None, cores)
  print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
