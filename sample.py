"""Samples a PixelDance video from a trained checkpoint.

  python sample.py --workdir=/tmp/run --prompt="a red square moves quickly to the right" \
      --first_frame=first.png [--last_frame=last.png] --tau=25 --output=out/video.mp4

Without --first_frame, the first frame (and, unless given, the prompt) of a held-out
generated clip is used; --last_frame=heldout takes that clip's last frame.
"""

from absl import app, flags, logging

from pixeldance_jax import inference

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt. Default: the held-out clip's caption.")
_FIRST = flags.DEFINE_string("first_frame", None, "First frame image (PNG/JPEG). Default: the "
                             "first frame of held-out clip --heldout_index.")
_LAST = flags.DEFINE_string("last_frame", None, "Last frame image, or 'heldout' for the held-out "
                            "clip's last frame. Default: none (basic mode, text + first frame).")
_TAU = flags.DEFINE_integer("tau", None, "Leading sampler steps (from pure noise) that see the "
                            "last frame; 0 = never, >= steps = always. Default: config.sample.tau.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Text classifier-free guidance scale. "
                               "Default: config.sample.guidance_scale.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps. Default: config.sample.num_steps.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic). Default: config.sample.eta.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step; default latest.")
_RAW = flags.DEFINE_bool("raw_weights", False, "Use the raw weights instead of the EMA.")
_HELDOUT = flags.DEFINE_integer("heldout_index", 0, "Held-out clip used for missing inputs.")
_RESIZE = flags.DEFINE_bool("resize", True, "Resize images of the wrong size (else refuse).")
_UPSCALE = flags.DEFINE_integer("upscale", 4, "Nearest-neighbour upscale of the written video.")
_OUTPUT = flags.DEFINE_string("output", "samples/video.mp4", "Output .mp4 (a .gif, a "
                              "_frames.png contact sheet and a .json record go beside it).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  paths = inference.sample(
      _WORKDIR.value, prompt=_PROMPT.value, first_frame=_FIRST.value, last_frame=_LAST.value,
      tau=_TAU.value, guidance_scale=_GUIDANCE.value, steps=_STEPS.value, eta=_ETA.value,
      seed=_SEED.value, checkpoint_step=_CHECKPOINT_STEP.value, use_ema=not _RAW.value,
      heldout_index=_HELDOUT.value, resize=_RESIZE.value, upscale=_UPSCALE.value,
      output=_OUTPUT.value)
  print("wrote " + " ".join(paths))


if __name__ == "__main__":
  app.run(main)
