"""The smallest PixelDance that exercises every code path, for unit tests and CLI smoke runs."""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.data.frames = 4
  config.data.image_size = 16
  config.data.num_train_clips = 32
  config.data.num_test_clips = 4

  text = config.text_encoder
  text.hidden_size = 32
  text.intermediate_size = 64
  text.num_layers = 1
  text.num_heads = 2

  unet = config.unet
  unet.block_out_channels = (16, 32)
  unet.attention_levels = (False, True)
  unet.attention_head_dim = 16
  unet.norm_num_groups = 4
  unet.cross_attention_dim = 32

  config.conditioning.last_frame_warmup_steps = 0  # Last frames from the first step.
  # The paper's conditioning and no input skip, which the paper config trains with: the
  # candidate draw and the condition noise run (tests of the skip set it themselves).
  config.conditioning.last_frame_candidates = 3
  config.conditioning.noise_timestep = 100
  config.unet.input_skip = "none"

  config.batch_size = 4
  config.num_train_steps = 4
  config.warmup_steps = 1
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.sample.num_steps = 4
  config.sample.tau = 2
  return config
