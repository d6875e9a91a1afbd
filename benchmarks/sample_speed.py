"""Sampling speed: seconds per video and compile time, and the torch reference on CPU.

  python benchmarks/sample_speed.py [--steps=25,50] [--batch=1] [--repeats=3] [--notorch]
      [--nopaper] [--one_thread] [--paper_compile] [--config.tiny.data.image_size=64]
      [--config.paper.unet.dtype=bfloat16] (any field of the configs tiny and paper)

Measured (random weights, the whole jitted program: text encoding, CFG-batched denoising loop,
decoding):
  - tiny config (--config.tiny, configs/tiny.py: 8 frames of 32x32): the first call (trace +
    compile + run), then seconds per video at each step count. The step count is traced, so 25
    and 50 steps share one compiled program.
  - on CPU, the diffusers PyTorch `UNet3DConditionModel` with the tiny U-Net's layout and
    random weights running the same steps (CFG batch of 2, DDIMScheduler) at the same size.
Estimated, not run (paper config, --config.paper, configs/pixeldance.py: 16 frames of 256x256,
~1.5B U-Net):
  - XLA's FLOP count of one CFG U-Net step, the text encoder and the VAE, from the lowered
    programs on abstract weights (nothing materialised), and the seconds per video they imply
    at the FLOP rate the tiny program reached here and at an assumed accelerator rate
    (--assumed_tflops). With --paper_compile, also the time to compile the paper-size program
    for this machine.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from pixeldance_jax.cli import console
from pixeldance_jax.diffusion import samplers, schedules
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import program

import common
from tests import helpers  # The repository root is on sys.path (common).

_CONFIG = common.define_named_configs("tiny", "paper")
_STEPS = flags.DEFINE_list("steps", ["25", "50"], "Sampler step counts to time.")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos sampled at once (seconds are per video).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the fastest counts).")
_TORCH = flags.DEFINE_bool("torch", True, "Time the diffusers UNet3DConditionModel (CPU only).")
_PAPER = flags.DEFINE_bool("paper", True, "FLOP estimates for the paper config.")
_ASSUMED_TFLOPS = flags.DEFINE_float("assumed_tflops", 300.0, "Sustained TFLOP/s assumed for "
                                     "the accelerator estimate of the paper config (300: an "
                                     "H100 in bfloat16 at ~30% of its dense peak).")
_ONE_THREAD = flags.DEFINE_bool("one_thread", False, "One CPU thread for XLA and torch: a "
                                "steadier comparison on a machine other jobs share.")
_PAPER_COMPILE = flags.DEFINE_bool("paper_compile", False, "Also compile the paper-size "
                                   "program (minutes on CPU; nothing runs).")

GUIDANCE_SCALE = 7.5


def describe(config: ml_collections.ConfigDict) -> str:
  """"8 frames of 32x32, space_to_depth autoencoder, U-Net (48, 96)": what a config samples."""
  size = config.data.image_size
  return (f"{config.data.frames} frames of {size}x{size}, {config.autoencoder.kind} "
          f"autoencoder, U-Net {tuple(config.unet.block_out_channels)}")


def _inputs(config: ml_collections.ConfigDict, batch: int):
  size = config.data.image_size
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  return ["a red square moves quickly to the right"] * batch, frames, frames[::-1].copy()


def time_jax(config: ml_collections.ConfigDict, steps: list[int], batch: int,
             repeats: int) -> dict[str, float]:
  """First-call and per-video seconds of the jitted program (tau = half the steps)."""
  pipeline = helpers.random_pipeline(config)
  prompts, first, last = _inputs(config, batch)
  sample = lambda n: generate_lib.generate(pipeline, prompts, first, last, tau=n // 2, steps=n,
                                           guidance_scale=GUIDANCE_SCALE)
  results = {"first_call_s": common.timed(sample, steps[0])[1]}
  for n in steps:
    results[f"{n}_steps_s_per_video"] = common.best_seconds(lambda n=n: sample(n), repeats) / batch
  results["compile_s"] = results["first_call_s"] - results[f"{steps[0]}_steps_s_per_video"] * batch
  return results


def time_torch(config: ml_collections.ConfigDict, steps: list[int], batch: int,
               repeats: int) -> dict[str, float]:
  """Seconds per video of the diffusers U-Net loop: CFG batch, DDIM steps, no text/VAE."""
  import diffusers  # pylint: disable=g-import-not-at-top  # Development dependencies.
  import torch  # pylint: disable=g-import-not-at-top
  common.set_torch_threads(1 if _ONE_THREAD.value else 0)
  model = common.torch_unet3d(config)
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=config.diffusion.num_train_timesteps,
                                      timestep_spacing="trailing")
  size = config.data.image_size // config.autoencoder.patch_size
  channels = config.autoencoder.latent_channels
  shape = (batch, channels, config.data.frames, size, size)
  condition = torch.randn(shape)
  context = torch.randn(2 * batch, config.text_encoder.max_length, config.unet.cross_attention_dim)

  @torch.no_grad()
  def sample(n):
    scheduler.set_timesteps(n)
    latents = torch.randn(shape)
    for t in scheduler.timesteps:
      model_input = torch.cat([latents, condition], dim=1).repeat(2, 1, 1, 1, 1)
      both = model(model_input, t, context).sample
      conditional, unconditional = both.chunk(2)
      guided = unconditional + GUIDANCE_SCALE * (conditional - unconditional)
      latents = scheduler.step(guided, t, latents).prev_sample
    return latents

  sample(steps[0])  # Warm-up (allocator, oneDNN primitives).
  return {f"{n}_steps_s_per_video": common.best_seconds(lambda n=n: sample(n), repeats) / batch
          for n in steps}


def flops_per_video(config: ml_collections.ConfigDict, steps: int) -> dict[str, float]:
  """XLA's FLOP counts for one video (batch 1): text (x2), `steps` CFG U-Net calls, VAE."""
  model = pixeldance.make_model(config)
  params, frozen = pixeldance.abstract_weights(config, mesh_lib.make_mesh(config.mesh))
  model_input, timesteps, token_ids = pixeldance.dummy_inputs(config, batch=2)
  text = lambda p, ids: model.apply({"params": p}, ids, method=pixeldance.PixelDance.encode_text)
  context = jax.eval_shape(text, params, token_ids)
  denoise = lambda p, x, t, c: model.apply({"params": p}, x, t, c,
                                           method=pixeldance.PixelDance.denoise)
  size, frames = config.data.image_size, config.data.frames
  pixels = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  latents = jax.ShapeDtypeStruct((1, frames) + model_input.shape[2:4] +
                                 (config.autoencoder.latent_channels,), jnp.float32)
  vae = lambda f, op, x: getattr(autoencoder_lib.make_autoencoder(config, f.get("autoencoder")),
                                 op)(x)
  counts = {
      "unet_cfg_step": common.flops_of(denoise, params, model_input, timesteps, context),
      "text_encoder_x2": common.flops_of(text, params, token_ids),
      "vae_encode_2_frames": common.flops_of(lambda f, x: vae(f, "encode", x), frozen, pixels),
      "vae_decode": common.flops_of(lambda f, x: vae(f, "decode", x), frozen, latents)}
  counts["video"] = (steps * counts["unet_cfg_step"] + counts["text_encoder_x2"] +
                     counts["vae_encode_2_frames"] + counts["vae_decode"])
  return counts


def compile_seconds(config: ml_collections.ConfigDict, steps: int) -> float:
  """Compiles the whole sampling program on abstract weights; nothing runs."""
  mesh = mesh_lib.make_mesh(config.mesh)
  params, frozen = pixeldance.abstract_weights(config, mesh)
  size, length = config.data.image_size, config.text_encoder.max_length
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  batch = {"seeds": spec((1,), jnp.int32), "first_frame": spec((1, size, size, 3), jnp.uint8),
           "last_frame": spec((1, size, size, 3), jnp.uint8),
           "use_first_frame": spec((1,), jnp.float32),
           "token_ids": spec((1, length), jnp.int32),
           "null_token_ids": spec((1, length), jnp.int32),
           "tau": spec((1,), jnp.int32), "guidance_scale": spec((1,), jnp.float32),
           "guidance_rescale": spec((1,), jnp.float32), "eta": spec((1,), jnp.float32)}
  shared = {"clip_index": np.int32(0), "schedule": samplers.make_schedule(
      schedules.alphas_cumprod(config.diffusion), steps)}
  lowered = program.make_generate_fn(config, mesh).lower(params, frozen, batch, shared, "ddim")
  return common.timed(lowered.compile)[1]


def print_tiny(config: ml_collections.ConfigDict, steps: list[int]) -> float:
  """Measures and prints the tiny config (and its torch reference); returns its FLOP/s."""
  print(f"\n[measured] tiny config ({describe(config)}), JAX, whole program:")
  jax_times = time_jax(config, steps, _BATCH.value, _REPEATS.value)
  for name, value in jax_times.items():
    print(f"  {name:28s} {value:8.3f}")
  tiny_flops = flops_per_video(config, steps[0])
  rate = tiny_flops["video"] / jax_times[f"{steps[0]}_steps_s_per_video"]
  print(f"  XLA FLOPs per video ({steps[0]} steps): {tiny_flops['video'] / 1e9:.1f} GFLOP, "
        f"i.e. {rate / 1e9:.1f} GFLOP/s reached")
  if _TORCH.value and jax.devices()[0].platform == "cpu":
    print("\n[measured] same size and steps, diffusers UNet3DConditionModel (PyTorch, CPU), "
          "U-Net + DDIM loop only:")
    torch_times = time_torch(config, steps, _BATCH.value, _REPEATS.value)
    for n in steps:
      key = f"{n}_steps_s_per_video"
      print(f"  {key:28s} {torch_times[key]:8.3f}   torch / JAX = "
            f"{torch_times[key] / jax_times[key]:.2f}x")
  return rate


def print_paper(config: ml_collections.ConfigDict, steps: list[int], rate: float) -> None:
  """Prints the paper config's FLOP estimates at `rate` FLOP/s and at --assumed_tflops."""
  print(f"\n[estimated, not run] paper config ({describe(config)}):")
  for n in steps:
    counts = flops_per_video(config, n)
    print(f"  {n} steps: {counts['video'] / 1e12:.1f} TFLOP per video (U-Net CFG step "
          f"{counts['unet_cfg_step'] / 1e12:.2f}, VAE decode {counts['vae_decode'] / 1e12:.2f}, "
          f"text {counts['text_encoder_x2'] / 1e12:.3f}); at this machine's "
          f"{rate / 1e9:.0f} GFLOP/s: ~{counts['video'] / rate / 60:.0f} min per video; at an "
          f"assumed {_ASSUMED_TFLOPS.value:.0f} TFLOP/s: "
          f"~{counts['video'] / _ASSUMED_TFLOPS.value / 1e12:.1f} s per video")
  if _PAPER_COMPILE.value:
    print(f"  [measured] compile of the paper-size program: "
          f"{compile_seconds(config, steps[0]):.1f} s")


def main(argv):
  del argv
  common.start_jax(one_thread=_ONE_THREAD.value)
  steps = [int(n) for n in _STEPS.value]
  threads = 1 if _ONE_THREAD.value else common.cpu_cores()
  print(f"{common.machine_summary(threads)}; batch {_BATCH.value}; fastest of {_REPEATS.value} "
        "runs")
  rate = print_tiny(_CONFIG.value.tiny, steps)
  if _PAPER.value:
    print_paper(_CONFIG.value.paper, steps, rate)


if __name__ == "__main__":
  console.run(main)
