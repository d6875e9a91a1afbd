"""Sampling PixelDance videos from a checkpoint: the library behind sample.py and the evaluators.

  program.py   the jitted denoising program (one compile per batch shape and sampler)
  pipeline.py  `Pipeline`: weights + config + program; `load_pipeline` restores weights only
  generate.py  `generate` (one clip per example) and `generate_long` (chained clips)
  requests.py  `Request`s from arguments or a JSONL prompts file; settings checks; batching
  outputs.py   writing videos, contact sheets, frames and records
  jobs.py      `sample` and `sample_prompts_file`: the CLI's two jobs end to end

Modes, set by the inputs: basic (text + first frame), magic (text + first + last frame),
sketch (an edge map of an image as the last frame), and long video (N clips, each starting
from the previous clip's last generated frame).
"""
