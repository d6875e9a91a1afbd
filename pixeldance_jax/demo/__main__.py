"""Serves the PixelDance web demo over a trained (or converted) checkpoint:

  python -m pixeldance_jax.demo --workdir=workdirs/tiny [--port=7860]

then open http://127.0.0.1:7860/. The page takes a prompt, a first frame (a held-out clip's or
an upload), optionally a last frame (a held-out clip's, an upload, its edge map, or a sketch
drawn on a canvas), tau, guidance scale, steps, sampler, seed and the number of clips of a long
video, and shows the video, its frames and its settings. The weights are restored once;
requests are sampled one at a time, in order. The newest --max_outputs videos are kept in
--output_dir, each in a folder of an unguessable name.
"""

import sys

from absl import app, flags

from pixeldance_jax.cli import console
from pixeldance_jax.demo import app as app_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or converted checkpoint "
                               "directory) holding checkpoints/. Required.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step. Default: "
                                        "the latest.")
_RAW = flags.DEFINE_bool("raw_weights", False, "Use the raw weights instead of the EMA.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                            "interface; then pass --token).")
_TOKEN = flags.DEFINE_string("token", "", "A secret every visitor must give (the printed URL "
                             "carries it once; a cookie keeps it). Empty: none, which is "
                             "only safe on a loopback --host.")
_MAX_OUTPUTS = flags.DEFINE_integer("max_outputs", 1000, "Outputs kept in --output_dir; the "
                                    "oldest are removed first.")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on (0: any free port).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where each video's folder is written. "
                                  "Default: WORKDIR/demo.")
_NUM_HELDOUT = flags.DEFINE_integer("num_heldout", 64, "Held-out clips of the run's dataset "
                                    "offered as first and last frames (0: uploads only).")
_MAX_CLIPS = flags.DEFINE_integer("max_clips", 8, "Most clips a long-video request may ask for.")
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile the sampler at start (a one-step "
                             "video), so that the first request does not wait for it.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    demo = app_lib.load_demo(_WORKDIR.value, checkpoint_step=_CHECKPOINT_STEP.value,
                             use_ema=not _RAW.value, output_dir=_OUTPUT_DIR.value,
                             num_heldout=_NUM_HELDOUT.value, max_clips=_MAX_CLIPS.value,
                             max_outputs=_MAX_OUTPUTS.value)
    app_lib.serve(demo, _HOST.value, _PORT.value, warm_up=_WARM_UP.value, token=_TOKEN.value)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"pixeldance_jax.demo: error: {error}")


if __name__ == "__main__":
  console.run(main)
