"""Tiny PixelDance that trains on CPU in minutes on generated moving shapes.

Pixel space through an invertible space-to-depth "autoencoder" (32x32x3 -> 8x8x48), a small
CLIP-architecture text encoder trained from scratch, attention only at 4x4 (and the mid block).
On CPU the step is memory-bound, so activation volume (positions x channels) sets its cost.
"""

from configs import pixeldance


def get_config():
  config = pixeldance.get_config()
  config.data.frames = 8
  config.data.image_size = 32
  config.data.num_train_clips = 8000
  config.data.num_test_clips = 512  # 256 held-out clips for FVD, and 256 more for its floor.
  config.data.second_object_prob = 0.0
  config.data.background_color_prob = 0.0
  config.data.worker_count = 0
  config.data.build_workers = 0
  config.data.image_every_k_steps = 0  # Video batches only: the CPU recipe stays as measured.
  # One program per step: on XLA:CPU the fused step is a few percent faster, and without image
  # steps there is no second step to share the update with (docs/benchmarks.md).
  config.separate_update = False

  config.autoencoder.kind = "space_to_depth"
  config.autoencoder.patch_size = 4
  config.autoencoder.latent_channels = 48
  config.autoencoder.scaling_factor = 1.0

  text = config.text_encoder
  text.max_length = 16
  text.hidden_size = 64
  text.intermediate_size = 128
  text.num_layers = 2
  text.num_heads = 2
  text.trainable = True  # No pretrained CLIP here: learn it with the U-Net.

  unet = config.unet
  unet.block_out_channels = (48, 96)
  unet.attention_levels = (False, True)
  unet.layers_per_block = 1
  unet.attention_head_dim = 48
  unet.norm_num_groups = 8
  unet.cross_attention_dim = 64
  unet.transformer_in_heads = 1  # One head of attention_head_dim (= the 48 channels).
  unet.temporal_conv_dropout = 0.0
  unet.pooled_text_embedding = True  # A global path for the text, beside cross-attention.
  # The given frames reach the output directly, so the U-Net need not redraw the shape from its
  # 8x8 tokens (docs/fidelity.md).
  unet.input_skip = "conditions"

  config.diffusion.beta_schedule = "linear"
  config.diffusion.beta_start = 0.0001
  config.diffusion.beta_end = 0.02
  # Measured on this config after 1500 steps: epsilon-prediction samples pure noise (the z_0 it
  # implies at t ~ T amplifies the error by 1/sqrt(alpha_bar) ~ 150); v-prediction draws the
  # shape but leaves the background noisy (at small t it must predict the noise). Predicting
  # z_0 itself gives clean frames in the same budget.
  config.diffusion.prediction_type = "sample"

  # The text learns the motion first: the first 1000 steps drop every last frame, then the
  # paper's eta = 0.25 applies. Measured after 1500 steps (64 held-out clips): without the
  # warmup the model ignores its text (basic-mode direction cosine -0.01 at eta 0.25, 0.62 at
  # eta 0.75: the last frame gives the motion away); with it 0.97, and the last frame is still
  # met to 1.3 px.
  config.conditioning.last_frame_warmup_steps = 1000
  # The given last frame is the clip's last (what a user gives), and the given frames carry no
  # condition noise, so the input skip can copy them into place.
  config.conditioning.last_frame_candidates = 1
  config.conditioning.noise_timestep = 0

  config.batch_size = 8
  config.num_train_steps = 1500
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  config.lr_schedule = "cosine"
  config.weight_decay = 0.0
  config.ema_decay = 0.995  # A horizon of ~200 steps suits a 1500-step run.

  config.log_every_steps = 50
  config.checkpoint_every_steps = 500

  config.eval.num_videos = 64  # Periodic evaluation and the ablation's default --num_videos.

  config.sample.num_steps = 25
  config.sample.tau = 25
  config.sample.guidance_scale = 2.0
  config.sample.clip_denoised = True
  return config
