"""Paper-size PixelDance (arXiv 2311.10982): 16 frames at 4 fps, 256x256 pixels, ~1.5B U-Net.

Every field is overridable from the command line, e.g.
`--config.conditioning.last_frame_drop_prob=1.0` (the "without last frame" ablation).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A converted pretrained checkpoint (python -m pixeldance_jax.convert) to start from; used
  # only when the workdir has no checkpoint of its own yet.
  config.init_from = ""

  # --- Data --------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "moving_shapes"  # Key of pixeldance_jax.data.loaders.DATASETS.
  data.data_dir = ""  # Empty: <workdir>/data.
  data.frames = 16
  data.image_size = 256
  data.fps = 4
  data.num_train_clips = 20000
  data.num_test_clips = 200
  data.generator_seed = 0
  data.second_object_prob = 0.25  # Moving shapes: probability of a static distractor.
  data.background_color_prob = 0.25  # Moving shapes: probability of a non-black background.
  # Moving shapes: probability of a detour or a pause between the straight path's ends (what a
  # middle keyframe decides; moving_shapes.PATHS).
  data.path_change_prob = 0.0
  data.worker_count = 2  # grain worker processes; 0 = in the main process.
  data.shuffle_seed = 0
  # Local videos (name "video_folder" or "webvid_csv"; README "Training on your own videos").
  data.video_dir = ""  # Folder of videos (searched recursively).
  data.captions = ""  # video_folder: CSV (file, caption), default <video_dir>/captions.csv,
  # else <video>.txt side files. webvid_csv: the WebVid-style CSV (videoid, name, duration).
  data.frame_stride = 0.0  # Source frames between kept frames; 0: source fps / data.fps.
  data.max_stored_frames = 64  # Frames stored per video (at data.fps) to pick windows from.
  data.random_start = True  # Training window: random start in the stored frames, else first.
  data.frame_format = "jpeg"  # Stored frames: "jpeg" (quality 95) or "png" (lossless).
  data.build_workers = 8  # Decoding processes while building; 0 or 1 = in this process.
  # Joint image training (docs/design.md): every k-th step is an image batch, temporal layers off.
  data.image_every_k_steps = 8  # 0 disables.
  data.image_dataset = "video_frames"  # "image_folder" (data.image_dir) or "video_frames".
  data.image_dir = ""  # Folder of images (captions as for video_folder).
  data.image_captions = ""  # CSV for image_dir; default <image_dir>/captions.csv.
  data.image_batch_size = 0  # Global images per image step; 0: batch_size * frames.
  # Train from pre-encoded VAE latent moments (and text embeddings when the text encoder is
  # frozen): `python -m pixeldance_jax.train.latent_cache` writes them once (or the trainer does).
  data.cache_latents = False

  # --- Frozen encoders ---------------------------------------------------
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.kind = "kl"  # Registry key in pixeldance_jax.models.autoencoder (the SD KL VAE).
  ae.patch_size = 8  # Downsampling factor (the SD VAE is 8x).
  ae.latent_channels = 4
  ae.scaling_factor = 0.18215
  # KL autoencoder (diffusers AutoencoderKL layout); weights come from a converted checkpoint.
  ae.block_out_channels = (128, 256, 512, 512)
  ae.layers_per_block = 2
  ae.norm_num_groups = 32
  ae.decode_chunk_frames = 8  # Frames decoded at once (bounds memory).

  config.text_encoder = text = ml_collections.ConfigDict()
  text.vocab_size = 49408
  text.max_length = 77
  text.hidden_size = 768
  text.intermediate_size = 3072
  text.num_layers = 12
  text.num_heads = 12
  text.pad_token_id = 49407
  text.hidden_act = "quick_gelu"
  text.use_penultimate_layer = False  # SD 2.x-style penultimate hidden state.
  text.trainable = False  # The paper freezes CLIP.

  # --- 3D U-Net ----------------------------------------------------------
  config.unet = unet = ml_collections.ConfigDict()
  unet.block_out_channels = (320, 640, 1280, 1280)
  unet.attention_levels = (True, True, True, False)  # Per level: spatial + temporal attention.
  unet.layers_per_block = 2
  unet.attention_head_dim = 64
  # Spatial transformer heads at every level; 0: channels // attention_head_dim (ModelScope,
  # SD 2.x). Set 8 to load an SD 1.x UNet2DConditionModel (diffusers' "attention_head_dim" there).
  unet.num_attention_heads = 0
  unet.transformer_in_heads = 8  # Temporal attention after conv_in: heads of attention_head_dim.
  unet.norm_num_groups = 32
  unet.norm_eps = 1e-5  # ResNet and conv_norm_out GroupNorms (diffusers' `norm_eps`).
  unet.cross_attention_dim = 768  # Must equal text_encoder.hidden_size.
  unet.temporal_position_embedding = False  # Frame position embedding in temporal attention.
  unet.pooled_text_embedding = False  # Add the mean text embedding to the time embedding.
  # Add inputs times a gain set by the time embedding to the output: "none", "conditions"
  # (c_image) or "all" (the noisy latent too).
  unet.input_skip = "none"
  # Hidden width of a head that reads the last features beside the raw inputs; 0: none.
  unet.refiner_channels = 0
  unet.dropout = 0.0  # In the ResNets.
  unet.temporal_conv_dropout = 0.1  # Before temporal convs 2-4 (ModelScope's value).
  # Activation recomputation per layer (ResNet, temporal conv, transformers): "none", "full" or a
  # jax.checkpoint_policies name such as "dots_saveable" (unet3d.REMAT_POLICIES).
  unet.remat_policy = "none"
  unet.dtype = "float32"  # Compute dtype; parameters stay float32.
  # "xla", "cudnn" (GPU, 16-bit dtype) or "splash" (Pallas, for TPU; interpreted elsewhere).
  unet.attention_impl = "xla"
  # Formulation of GroupNorm, the temporal and 1x1 convs, Dense and GELU (same weights, same
  # function): "auto" (XLA:CPU's own for CPU programs, the portable one for GPU and TPU),
  # "portable" or "cpu".
  unet.kernels = "auto"

  # --- Diffusion ---------------------------------------------------------
  config.diffusion = diff = ml_collections.ConfigDict()
  diff.num_train_timesteps = 1000
  diff.beta_schedule = "scaled_linear"
  diff.beta_start = 0.00085
  diff.beta_end = 0.012
  diff.prediction_type = "epsilon"  # or "v_prediction", or "sample" (z_0).
  # > 0: Min-SNR-gamma loss weighting (Hang et al., 2023; 5 in the paper); 0: unweighted.
  diff.min_snr_gamma = 0.0

  # --- PixelDance conditioning (training) --------------------------------
  config.conditioning = cond = ml_collections.ConfigDict()
  cond.use_first_frame = True  # False (with use_last_frame False): the T2V baseline.
  cond.use_last_frame = True
  cond.last_frame_candidates = 3  # The last frame is drawn from the clip's last N frames.
  cond.noise_timestep = 100  # Forward-process noise level added to c_image.
  cond.last_frame_drop_prob = 0.25  # eta in the paper.
  # The first N steps drop every last frame (eta = 1), so that the text learns the motion
  # before the last frame can give it away. 0: the paper's recipe.
  cond.last_frame_warmup_steps = 0
  cond.text_drop_prob = 0.1  # For classifier-free guidance.
  cond.use_text = True  # False: the "without text" ablation (the empty prompt always).
  # Keyframes besides the first and last (not in the paper; 0 keeps its conditioning exactly):
  cond.keyframe_prob = 0.0  # An example gets 1..keyframe_max_count frames at random middle
  cond.keyframe_max_count = 1  # positions with this probability.
  cond.leading_frames_prob = 0.0  # An example gets its first 2..max_leading_frames frames
  cond.max_leading_frames = 2  # (how a long video's next clip continues the one before).
  cond.keyframe_mask = False  # c_image gains a channel, 1 where a frame is given.

  # --- Optimisation ------------------------------------------------------
  config.batch_size = 192  # Global batch.
  config.num_train_steps = 200_000
  config.learning_rate = 5e-5
  config.warmup_steps = 1000
  config.lr_schedule = "constant"  # or "cosine".
  config.weight_decay = 0.01
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.grad_clip_norm = 1.0
  config.ema_decay = 0.9999
  config.ema_warmup = True  # decay_t = min(ema_decay, (1 + t) / (10 + t)).
  # Microbatches per optimiser step (gradients averaged); each holds batch_size / this.
  config.grad_accum_steps = 1
  # The update (AdamW, clipping, EMA) as a program of its own after the gradients' program:
  # the video and image steps share it, and the TPU compiler plans the two in less host memory
  # than the fused step (docs/tpu.md). False: one program per step (configs/tiny.py, on CPU).
  config.separate_update = True

  # --- Parallelism -------------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axes.
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis name -> mesh axes. Model code speaks only the logical names.
  config.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("frames", None),
      ("height", None),
      ("width", None),
      ("length", None),
      ("embed", "fsdp"),
      ("channels", None),
      # Conv kernels [*window, in, out]: in over fsdp, out over tensor. Mapping conv_in to None
      # replicated every conv kernel (~60% of the U-Net) under pure fsdp.
      ("conv_in", "fsdp"),
      ("conv_out", "tensor"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("norm", None),
  )

  # --- Bookkeeping -------------------------------------------------------
  config.log_every_steps = 50
  config.checkpoint_every_steps = 2000
  config.max_checkpoints_to_keep = 3
  config.keep_checkpoint_every_steps = 0  # Steps kept for good (multiples of this); 0 = none.
  config.sample_every_steps = 0  # Sample a held-out clip into samples/ and TensorBoard; 0 = off.
  config.peak_flops_per_device = 0.0  # For MFU when the device kind is not in metrics' table.

  # --- Sampling ----------------------------------------------------------
  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = "ddim"  # Key of samplers.SAMPLERS: "ddim", "ddpm" or "dpmpp_2m".
  sample.num_steps = 50
  sample.tau = 25  # Leading sampler steps (from pure noise) that see the last frame.
  sample.guidance_scale = 7.5  # Text-only classifier-free guidance.
  sample.guidance_rescale = 0.0  # Lin et al. 2023 rescale phi (DynamiCrafter: 0.7); 0 = off.
  sample.eta = 0.0  # DDIM eta (0: deterministic).
  sample.timestep_spacing = "trailing"
  sample.clip_denoised = False
  sample.condition_noise = True  # Add cond.noise_timestep noise to c_image at inference too.

  # --- Evaluation (python -m pixeldance_jax.evaluate; periodic when eval_every_steps > 0) ------
  config.eval_every_steps = 0  # Metrics of sampled held-out clips into eval/ and TensorBoard.
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.metrics = ("fvd",)  # Of fvd, fid, clipsim, conditioning.
  evaluation.variants = ("magic", "basic")  # Of magic, basic, no_text, text_only.
  evaluation.num_videos = 256  # Held-out clips, sampled once per variant.
  evaluation.batch_size = 16  # Videos per global batch (sampling and features).
  evaluation.fid_weights = ""  # pytorch-fid's Inception .pth; "" skips FID.
  evaluation.clip_model = ""  # A transformers CLIPModel folder; "" skips CLIPSIM.
  evaluation.cache_dir = ""  # Real-data statistics; "" = ~/.cache/pixeldance_jax/eval_stats.
  return config
