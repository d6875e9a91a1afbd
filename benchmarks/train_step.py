"""Train-step speed: compile time, step time, peak memory, FLOPs and MFU, across meshes.

  python benchmarks/train_step.py [--runs=tiny@1x1x1,mid@2x2x2] [--steps=3]
      [--cpu_devices=8] [--torch_configs=tiny] [--torch_threads=0,1] [--notorch]
      [--config.mid.batch_size=16] [--config.tiny.unet.dtype=bfloat16]
      [--config.paper.unet.remat_policy=full] (any field of the configs tiny, mid and paper)
  # More meshes on 8 fake CPU devices (each mesh is one more compile, ~1 min on 2 cores):
  python benchmarks/train_step.py --runs=tiny@1x1x1,tiny@8x1x1,tiny@2x4x1,tiny@2x2x2,mid@1x1x1
  # On an accelerator host, the paper-size config (bfloat16 U-Net, one clip per device), e.g.
  # one H100 (add --config.paper.unet.attention_impl=cudnn, --config.paper.unet.remat_policy=...
  # to try them):
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
  - MFU: per-device TFLOP/s over the device kind's dense bfloat16 peak
    (`pixeldance_jax/train/throughput.py`, as in the training logs), whatever the U-Net dtype.
    CPU: no peak is known, "n/a". `--config.NAME.peak_flops_per_device` overrides the table.
  - GiB/dev: on GPU/TPU `device.memory_stats()["peak_bytes_in_use"]` ("dev"), the process's
    high-water mark, so list runs in increasing size; elsewhere, and with --compile_only, XLA's
    memory plan of the compiled step ("xla": arguments + outputs - donated aliases +
    temporaries), per device.
On CPU (--torch), per --torch_configs config, one device, float32, two pairs:
  - U-Net only: the diffusers PyTorch `UNet3DConditionModel` of the same layout, latent size,
    frames and batch (forward + backward + AdamW step, MSE on random latents) against our U-Net
    alone on the same inputs with optax AdamW;
  - whole step: the config's 1x1x1 row (`step.train_step`: text encoder, autoencoder encode,
    conditioning, U-Net, clipped AdamW, EMA) against the same work in PyTorch
    (`torch_full_step`: a transformers `CLIPTextModel` of the config's size, the diffusers
    U-Net with the pooled text in its time embedding, the same conditions, target, clipping,
    AdamW and EMA). Also printed: torch's U-Net-only step over our whole step, the stricter
    figure earlier versions reported.
All steps alternate in one process, so machine load hits all alike; ratios are
torch seconds / JAX seconds (> 1: JAX faster). torch is timed at each --torch_threads count:
at as many threads as cores its OpenMP workers spin and stall when other processes share the
cores, so one thread is the fairer figure on a loaded machine. JAX runs with XLA's default CPU thread pool.
"""

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

from pixeldance_jax.cli import console
from pixeldance_jax.diffusion import schedules
from pixeldance_jax.models import unet3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.parallel import sharding
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import throughput

import common


def paper_bf16_config() -> ml_collections.ConfigDict:
  """The paper config with a bfloat16 U-Net and one clip per device (it must fit one chip)."""
  config = common.CONFIGS["paper"]()
  config.unet.dtype = "bfloat16"
  config.batch_size = 0  # Resolved to the data-parallel device count in `resolve_config`.
  return config


_CONFIG = common.define_named_configs("tiny", "mid", paper=paper_bf16_config)
_RUNS = flags.DEFINE_list("runs", ["tiny@1x1x1", "mid@2x2x2"], "CONFIG@MESH items, run in this "
                          "order: CONFIG a name of --config (tiny, mid, paper), MESH data x fsdp "
                          "x tensor (one axis may be -1: all remaining devices).")
_TORCH_CONFIGS = flags.DEFINE_list("torch_configs", ["tiny"], "Configs compared with torch.")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["0", "1"], "torch intra-op thread counts "
                                   "to time, each against the same JAX steps; 0: CPU cores.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per measurement (the median counts).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "Fake CPU devices (no effect on GPU/TPU "
                                    "devices).")
_TORCH = flags.DEFINE_bool("torch", True, "On CPU, the diffusers U-Net step beside ours.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile and count, run nothing.")

COLUMNS = (("config", 6, ""), ("mesh", 7, ""), ("dtype", 9, ""), ("batch", 5, ""),
           ("params", 9, ""), ("lower s", 7, ".1f"), ("compile s", 9, ".1f"),
           ("step s", 8, ".3f"), ("clips/s", 8, ".2f"), ("TFLOP/step", 10, ".4f"),
           ("TFLOP/s/d", 9, ".4f"), ("MFU", 6, ""), ("GiB/dev", 7, ".3f"), ("src", 3, ""))


def parse_run(item: str) -> tuple[str, tuple[int, int, int]]:
  """"tiny@2x2x2" -> ("tiny", (2, 2, 2)); a -1 axis takes the remaining devices."""
  name, _, mesh_text = item.partition("@")
  if name not in _CONFIG.value:
    raise app.UsageError(f"--runs item {item!r}: config {name!r} is not one of "
                         f"{list(_CONFIG.value)}.")
  try:
    return name, common.parse_mesh(mesh_text or "1x1x1", jax.device_count())
  except ValueError as error:
    raise app.UsageError(f"--runs item {item!r}: {error}") from error


def resolve_config(name: str, shape: tuple[int, int, int]) -> ml_collections.ConfigDict:
  """--config.NAME on the mesh `shape`; batch 0 becomes one clip per data-parallel device."""
  config = _CONFIG.value[name].copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  config.batch_size = config.batch_size or shape[0] * shape[1]
  return config


def run_steps(config: ml_collections.ConfigDict, mesh, step: step_lib.CompiledStep) -> float:
  """Median seconds of --steps steps of `step` after one warm-up, from random weights."""
  one_step = common.step_runner(config, mesh, step)
  one_step()  # Warm-up: first-run allocations, autotuning.
  return common.median_seconds(one_step, _STEPS.value)


def measure(name: str, shape: tuple[int, int, int]) -> tuple[dict, object]:
  """One row of the table (compile, run --steps steps unless --compile_only, count) and the
  compiled step."""
  config = resolve_config(name, shape)
  devices = jax.devices()[:math.prod(shape)]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  compiled, flops, compile_s, abstract = common.compile_step(config, mesh)
  ran = not _COMPILE_ONLY.value
  step_s = run_steps(config, mesh, compiled) if ran else float("nan")
  memory_gib, memory_source = common.peak_memory_gib(compiled, devices, ran)
  flops_per_s = flops / step_s / len(devices)  # Per device.
  peak = throughput.peak_flops_per_device(devices[0], config.peak_flops_per_device)
  mfu = flops_per_s / peak if peak else float("nan")
  return {"config": name, "mesh": "x".join(map(str, shape)), "dtype": config.unet.dtype,
          "batch": config.batch_size,
          "params": f"{state_lib.count_params(abstract.params) / 1e6:.1f}M",
          "lower_s": compile_s[0], "compile_s": compile_s[1], "step_s": step_s,
          "clips_per_s": config.batch_size / step_s, "tflop_per_step": flops / 1e12,
          "tflops_per_device": flops_per_s / 1e12,
          "mfu": "n/a" if math.isnan(mfu) else f"{100 * mfu:.1f}%", "memory_gib": memory_gib,
          "memory_source": memory_source}, compiled


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

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     compiler_options=mesh_lib.train_compiler_options(mesh))  # As the full step.
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
  import torch  # pylint: disable=g-import-not-at-top  # A development dependency.
  # eval(): dropout off, as in our step (the tiny and mid configs set no dropout); autograd
  # is unaffected (diffusers' U-Net has no batch norm).
  model = common.torch_unet3d(config)
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


def torch_full_step(config: ml_collections.ConfigDict):
  """The whole train step in PyTorch, the same work as `step.train_step`: `run()` -> loss.

  From the loader's batch (uint8 video, token ids): pixels to latents (space_to_depth, the
  config's autoencoder), the training conditions (text dropout, the last frame drawn from the
  clip's last frames, condition noise at `noise_timestep`, last-frame dropout, c_image), a
  transformers `CLIPTextModel` of the config's size (random weights, trained), the diffusers
  U-Net with the pooled text added to its time embedding, the config's prediction target,
  global-norm clipping, AdamW, a non-finite guard and the EMA of the weights.
  """
  import torch  # pylint: disable=g-import-not-at-top  # Development dependencies.
  import transformers  # pylint: disable=g-import-not-at-top
  if config.autoencoder.kind != "space_to_depth":
    raise ValueError("The torch whole step mirrors the space_to_depth autoencoder only.")
  text, cond = config.text_encoder, config.conditioning
  unet = common.torch_unet3d(config, pooled_text=True)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
      num_attention_heads=text.num_heads, max_position_embeddings=text.max_length,
      hidden_act=text.hidden_act, eos_token_id=text.pad_token_id))
  params = list(unet.parameters()) + list(clip.parameters())
  ema = [p.detach().clone() for p in params]
  optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_b1,
                                config.adam_b2), weight_decay=config.weight_decay)
  alpha_bar = torch.from_numpy(schedules.alphas_cumprod(config.diffusion))
  null_tokens = torch.tensor(np.asarray(step_lib.null_token_ids(config)), dtype=torch.long)
  batch = {k: torch.from_numpy(v) for k, v in common.synthetic_batch(config).items()}
  generator = torch.Generator().manual_seed(0)
  size, frames = config.batch_size, config.data.frames
  holder = {"step": 0}

  def alpha(timesteps, ndim):  # alpha_bar per example, broadcastable to [b, ...] of ndim.
    return alpha_bar[timesteps].reshape((-1,) + (1,) * (ndim - 1))

  def noised(clean, timesteps):  # [b, c, f, h, w] or [b, c, h, w]; z_t = q(z_t | z_0).
    a = alpha(timesteps, clean.ndim)
    noise = torch.randn(clean.shape, generator=generator)
    return a.sqrt() * clean + (1 - a).sqrt() * noise, noise

  def velocity(clean, noise, timesteps):  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) z_0.
    a = alpha(timesteps, clean.ndim)
    return a.sqrt() * noise - (1 - a).sqrt() * clean

  def bernoulli(prob):
    return torch.rand(size, generator=generator) < prob

  def run():
    # [b, f, H, W, 3] uint8 -> [-1, 1] -> space_to_depth latents [b, c, f, h, w].
    pixels = batch["video"].float().div(127.5).sub(1.0).permute(0, 1, 4, 2, 3).flatten(0, 1)
    latents = torch.nn.functional.pixel_unshuffle(pixels, config.autoencoder.patch_size)
    latents = latents.unflatten(0, (size, frames)).transpose(1, 2)
    tokens = torch.where(bernoulli(cond.text_drop_prob)[:, None], null_tokens, batch["tokens"])
    last_index = frames - 1 - torch.randint(0, cond.last_frame_candidates, (size,),
                                            generator=generator)
    last = latents[torch.arange(size), :, last_index]
    condition_t = torch.full((size,), cond.noise_timestep)
    first, _ = noised(latents[:, :, 0], condition_t)
    last, _ = noised(last, condition_t)
    last = torch.where(bernoulli(cond.last_frame_drop_prob)[:, None, None, None], 0.0, last)
    image_condition = torch.zeros_like(latents)
    image_condition[:, :, 0], image_condition[:, :, -1] = first, last

    timesteps = torch.randint(0, config.diffusion.num_train_timesteps, (size,),
                              generator=generator)
    noisy, noise = noised(latents, timesteps)
    context = clip(input_ids=tokens).last_hidden_state
    prediction = unet(torch.cat([noisy, image_condition], 1), timesteps, context,
                      timestep_cond=context.mean(1)).sample
    target = {"epsilon": lambda: noise, "sample": lambda: latents,
              "v_prediction": lambda: velocity(latents, noise, timesteps)
              }[config.diffusion.prediction_type]()
    loss = torch.nn.functional.mse_loss(prediction, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
      optimizer.step()
      step = holder["step"]
      decay = min(config.ema_decay, (1 + step) / (10 + step)) if config.ema_warmup else (
          config.ema_decay)
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)  # pylint: disable=protected-access
      holder["step"] = step + 1
    return loss.item()

  return run


def compare_with_torch(name: str, full_step=None) -> None:
  """Alternating steps on one device: our U-Net-only step and torch's, and (given `full_step`,
  a compiled step of `name` on a 1x1x1 mesh) our whole step and torch's; prints seconds and
  ratios."""
  config = resolve_config(name, (1, 1, 1))
  jax_run, jax_params = jax_unet_step(config)
  torch_run, torch_params = torch_unet_step(config)
  threads = [int(t) or common.cpu_cores() for t in _TORCH_THREADS.value]
  runs = {"jax": jax_run}
  runs |= {t: functools.partial(run_torch, torch_run, t) for t in threads}
  if full_step is not None:
    runs["full"] = common.step_runner(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]),
                               full_step)
    torch_full_run = torch_full_step(config)
    runs |= {("full", t): functools.partial(run_torch, torch_full_run, t) for t in threads}
  for run in runs.values():
    run()  # Warm-up (JAX: compile; torch: allocator, oneDNN primitives).
  times = {key: [] for key in runs}
  for _ in range(_STEPS.value):
    for key, run in runs.items():
      times[key].append(common.timed(run)[1])
  median = {key: float(np.median(values)) for key, values in times.items()}
  size = config.data.image_size // config.autoencoder.patch_size
  print(f"  {name}: latents {config.batch_size}x{config.data.frames}x{size}x{size}x"
        f"{2 * config.autoencoder.latent_channels}->{config.autoencoder.latent_channels}, "
        f"U-Net params JAX {jax_params / 1e6:.2f}M / torch {torch_params / 1e6:.2f}M")
  print(f"    JAX U-Net-only step {median['jax']:.3f} s"
        + (f"; JAX whole step {median['full']:.3f} s" if "full" in median else ""))
  for t in threads:
    line = (f"    torch, {t} thread(s): U-Net-only {median[t]:.3f} s -> torch / JAX = "
            f"{median[t] / median['jax']:.2f}x")
    if "full" in median:
      line += (f"; whole step {median['full', t]:.3f} s -> torch / JAX = "
               f"{median['full', t] / median['full']:.2f}x (torch U-Net-only / JAX whole "
               f"step {median[t] / median['full']:.2f}x)")
    print(line)


def run_torch(torch_run, threads: int):
  """`torch_run()` at `threads` intra-op threads (set on every call: the runs alternate)."""
  common.set_torch_threads(threads)
  return torch_run()


def main(argv) -> None:
  del argv
  common.start_jax(cpu_devices=_CPU_DEVICES.value)
  start = time.perf_counter()
  platform = jax.devices()[0].platform
  print(f"{common.machine_summary()}; median of {_STEPS.value} steps after one warm-up"
        f"{'; compile only' if _COMPILE_ONLY.value else ''}")
  runs = [parse_run(item) for item in _RUNS.value]
  if platform == "cpu" and not _COMPILE_ONLY.value and any(name == "paper" for name, _ in runs):
    raise app.UsageError("The paper config runs on a GPU/TPU; on CPU add --compile_only.")
  print(common.header_line(COLUMNS))
  one_device_steps = {}
  for name, shape in runs:
    row, compiled = measure(name, shape)
    if shape == (1, 1, 1):
      one_device_steps[name] = compiled
    print(common.row_line(COLUMNS, list(row.values())), flush=True)
  if _TORCH.value and platform == "cpu" and not _COMPILE_ONLY.value:
    import torch  # pylint: disable=g-import-not-at-top  # A development dependency.
    print("\nOn one CPU device, alternating steps, float32: the diffusers UNet3DConditionModel "
          f"(PyTorch {torch.__version__}) vs our U-Net alone (same inputs, AdamW, MSE), and "
          "the whole step in both (text encoder, conditions, U-Net, clipped AdamW, EMA):")
    for name in _TORCH_CONFIGS.value:
      compare_with_torch(name, one_device_steps.get(name))
  print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  console.run(main, reuse_freed_memory=True)
