"""Samples PixelDance videos from a trained or converted checkpoint.

One video (basic mode: text + first frame; magic: + --last_frame; sketch: + --last_frame_edges):

  python sample.py --workdir=/tmp/run --prompt="a red square moves quickly to the right" \\
      --first_frame=first.png [--last_frame=last.png] --tau=25 --output=out/video.mp4

Keyframes in the middle of the clip too (a model trained with keyframes follows them):

  python sample.py --workdir=/tmp/run --prompt="..." --first_frame=first.png \
      --keyframe=3:middle.png --last_frame=last.png

A long video of N clips, each starting from the previous clip's last frame, or its last k
frames with --overlap_frames=k, drawing its last r again with --redraw_frames=r (one --prompt
for all clips, or one --prompt per clip):

  python sample.py --workdir=/tmp/run --first_frame=first.png --num_clips=4 --prompt="..."

A batch job, one JSON object a line (keys: prompt, first_frame, last_frame, last_frame_edges,
keyframes ({"3": "middle.png"}), heldout_index, name, tau, seed, guidance_scale,
guidance_rescale, steps, eta, sampler, timestep_spacing, num_clips, overlap_frames,
redraw_frames; flags give the defaults), one folder per line in --output_dir:

  python sample.py --workdir=/tmp/run --prompts_file=jobs.jsonl --output_dir=out/

Without --first_frame, the first frame (and, unless given, the prompt) of a held-out
generated clip is used; --last_frame=heldout takes that clip's last frame, and
--keyframe=INDEX:heldout that clip's frame INDEX.
"""

import sys

from absl import app, flags

from pixeldance_jax.cli import console
from pixeldance_jax.diffusion import samplers
from pixeldance_jax.sampling import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or converted checkpoint "
                               "directory) holding checkpoints/. Required.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step. Default: "
                                        "the latest.")
_RAW = flags.DEFINE_bool("raw_weights", False, "Use the raw weights instead of the EMA.")

_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt; repeat it to give each clip "
                                    "of a long video its own. Default: the held-out clip's "
                                    "caption.")
_FIRST = flags.DEFINE_string("first_frame", None, "First frame image (PNG/JPEG). Default: the "
                             "first frame of held-out clip --heldout_index.")
_LAST = flags.DEFINE_string("last_frame", None, "Last frame image, or 'heldout' for the held-out "
                            "clip's last frame. Default: none (basic mode, text + first frame).")
_EDGES = flags.DEFINE_bool("last_frame_edges", False, "Turn --last_frame into an edge map (black "
                           "lines on white) first: the sketch mode.")
_KEYFRAME = flags.DEFINE_multi_string("keyframe", None, "INDEX:IMAGE: a keyframe at frame "
                                      "INDEX (1 to frames - 2) of the clip (the final clip of a "
                                      "long video); IMAGE 'heldout' takes the held-out clip's "
                                      "frame. Repeatable. Seen for the first --tau steps. "
                                      "Default: none.")
_HELDOUT = flags.DEFINE_integer("heldout_index", 0, "Held-out clip used for missing inputs.")
_RESIZE = flags.DEFINE_bool("resize", True, "Centre-crop and resize images of the wrong size "
                            "(else refuse them).")

_SAMPLER = flags.DEFINE_enum("sampler", None, sorted(samplers.SAMPLERS), "Sampler. Default: "
                             "config.sample.sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps. Default: config.sample.num_steps.")
_SPACING = flags.DEFINE_enum("timestep_spacing", None, list(samplers.TIMESTEP_SPACINGS),
                             "Which training timesteps the steps visit. Default: "
                             "config.sample.timestep_spacing.")
_TAU = flags.DEFINE_integer("tau", None, "Leading sampler steps (from pure noise) that see the "
                            "last frame; 0 = never, >= steps = always. Default: config.sample.tau.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Text classifier-free guidance scale "
                               "(1 = the conditional model alone). Default: "
                               "config.sample.guidance_scale.")
_RESCALE = flags.DEFINE_float("guidance_rescale", None, "Guidance rescale phi in [0, 1] (Lin et "
                              "al. 2023; 0 = off). Default: config.sample.guidance_rescale.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic); the other samplers ignore "
                          "it. Default: config.sample.eta.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (a prompts file's line k without a seed "
                             "gets seed + k).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", None, "Clips of a long video, each starting from "
                                  "the previous clip's last frame; --last_frame guides the "
                                  "final one. Default: the number of --prompt flags (1).")
_OVERLAP = flags.DEFINE_integer("overlap_frames", None, "A long video's next clip is "
                                "conditioned on the previous clip's last k frames (seen at "
                                "every step), so its motion carries on. Default: 1 (the last "
                                "frame alone).")
_REDRAW = flags.DEFINE_integer("redraw_frames", None, "A long video's next clip draws the "
                               "previous clip's last k frames again, conditioned on the "
                               "--overlap_frames before them (a clip's final frames, sampled "
                               "without a last frame, are its least certain). Default: 0.")

_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL batch job, one video a line "
                                    "(see the module help). Default: none (one video).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "samples", "With --prompts_file: one folder "
                                  "per line here (mp4, gif, contact sheet, frames, record.json).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "With --prompts_file: videos sampled at "
                                   "once, sharded over the data-parallel devices.")
_OUTPUT = flags.DEFINE_string("output", "samples/video.mp4", "Output .mp4 (a .gif, a "
                              "_frames.png contact sheet and a .json record go beside it).")
_UPSCALE = flags.DEFINE_integer("upscale", 4, "Nearest-neighbour upscale of the written video.")
flags.mark_flags_as_required(["workdir"])


def _settings() -> dict:
  return {"sampler": _SAMPLER.value, "steps": _STEPS.value, "timestep_spacing": _SPACING.value,
          "tau": _TAU.value, "guidance_scale": _GUIDANCE.value,
          "guidance_rescale": _RESCALE.value, "eta": _ETA.value, "seed": _SEED.value,
          "num_clips": _NUM_CLIPS.value, "overlap_frames": _OVERLAP.value,
          "redraw_frames": _REDRAW.value}


def _run() -> list[str]:
  checkpoint = {"checkpoint_step": _CHECKPOINT_STEP.value, "use_ema": not _RAW.value,
                "upscale": _UPSCALE.value}
  if _PROMPTS_FILE.value:
    single = [name for name, flag in (("prompt", _PROMPT), ("first_frame", _FIRST),
                                      ("last_frame", _LAST), ("keyframe", _KEYFRAME))
              if flag.value]
    if single:
      raise ValueError(f"--prompts_file gives every video's inputs; drop --{', --'.join(single)}")
    return jobs.sample_prompts_file(
        _WORKDIR.value, prompts_file=_PROMPTS_FILE.value, output_dir=_OUTPUT_DIR.value,
        batch_size=_BATCH_SIZE.value, resize=_RESIZE.value, **checkpoint, **_settings())
  prompts = _PROMPT.value or []
  return jobs.sample(
      _WORKDIR.value, output=_OUTPUT.value, **checkpoint,
      prompt=prompts if len(prompts) > 1 else (prompts[0] if prompts else None),
      first_frame=_FIRST.value, last_frame=_LAST.value, last_frame_edges=_EDGES.value,
      keyframes=_KEYFRAME.value, heldout_index=_HELDOUT.value, resize=_RESIZE.value, **_settings())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    paths = _run()
  # Inputs, settings, destinations and checkpoints: the library checks every one it can
  # before reading weights, and each error is one line.
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"sample.py: error: {error}")
  print("wrote " + " ".join(paths))


if __name__ == "__main__":
  console.run(main)
