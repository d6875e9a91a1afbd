"""Can the input pipeline keep up with training? Clips per second of each data stage.

  python benchmarks/data_throughput.py [--video_dir=DIR] [--image_size=256] [--frames=16]

1. Build (once per collection): PyAV decode at 4 fps + resize + centre-crop + JPEG encode of
   whole videos, with 1 and 2 decoding processes (`config.data.build_workers`), steady state
   (process start-up excluded); then the whole TFDS build, array_record writing included.
2. Load (every step): the grain loader (read array_record, pick the window, decode its JPEG
   frames, tokenise, batch) with 1 and 2 worker processes (`config.data.worker_count`), after
   every worker has produced a batch.

Each rate is printed beside the clips per second a train step consumes: the tiny config
(measured: 0.34 s per batch of 8 on this CPU) and the paper config, whose step rate is
estimated from the FLOPs of one training example (XLA cost analysis of `step.loss_fn` and its
gradient at batch 1, nothing materialised) at an assumed utilisation of an A100 (the paper
trains batch 192 on 32 A100s). Without --video_dir, synthetic 8 s 320x240 30 fps mp4s are
written to a temporary folder (moving noise: no easier to decode than real footage).
"""

import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # pylint: disable=wrong-import-position
import imageio  # pylint: disable=wrong-import-position
import multiprocessing  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import pixeldance  # pylint: disable=wrong-import-position
from pixeldance_jax.data import media, pipeline  # pylint: disable=wrong-import-position
from pixeldance_jax.data.builders import local_videos  # pylint: disable=wrong-import-position

_VIDEO_DIR = flags.DEFINE_string("video_dir", None, "Videos to measure; default: synthetic.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 16, "Synthetic videos to write.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Training frame size.")
_FRAMES = flags.DEFINE_integer("frames", 16, "Frames per training clip.")
_BATCHES = flags.DEFINE_integer("batches", 24, "Batches timed per loader setting.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Clips per loader batch.")
_PAPER_FLOPS = flags.DEFINE_bool("paper_flops", True, "Estimate the paper step from FLOPs.")

TINY_STEP_SECONDS, TINY_BATCH = 0.34, 8  # configs/tiny.py on this CPU (README, trainer log).
PAPER_BATCH, PAPER_CHIPS = 192, 32  # PAPER.md: batch 192 on 32 A100s.
A100_BF16_FLOPS, ASSUMED_MFU = 312e12, 0.4


def write_synthetic_videos(folder: str, count: int) -> None:
  rng = np.random.default_rng(0)
  for index in range(count):
    base = rng.integers(0, 255, (240 + 8 * 30, 320 + 8 * 30, 3), np.uint8)
    frames = [base[k:k + 240, k:k + 320] for k in range(8 * 30)]  # Pans 1 px per frame.
    imageio.mimwrite(os.path.join(folder, f"clip{index:03d}.mp4"), frames, fps=30,
                     macro_block_size=1, ffmpeg_log_level="error")
    pathlib.Path(folder, f"clip{index:03d}.txt").write_text(f"synthetic clip {index}")


def video_config(video_dir: str):
  config = pixeldance.get_config()
  config.data.name, config.data.video_dir = "video_folder", video_dir
  config.data.image_size, config.data.frames = _IMAGE_SIZE.value, _FRAMES.value
  config.data.max_stored_frames = max(32, _FRAMES.value)
  config.data.num_test_clips = 0
  config.batch_size = _BATCH_SIZE.value
  return config


def decode_rate(config, workers: int) -> float:
  """Videos per second through `media.encode_video_file` on `workers` warm processes."""
  builder_config = local_videos.LocalVideosConfig.from_config(config.data)
  paths = [entry.path for entry in builder_config.list_entries()]
  arguments = [(path, builder_config.sampling, builder_config.frame_format) for path in paths]
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    pool.starmap(media.encode_video_file, arguments[:workers])  # Start-up, imports.
    start = time.perf_counter()
    pool.starmap(media.encode_video_file, arguments, chunksize=1)
    return len(paths) / (time.perf_counter() - start)


def build_rate(config, data_dir: str) -> float:
  """Videos per second of the whole single-process TFDS build."""
  config.data.build_workers = 0
  start = time.perf_counter()
  builder = pipeline.build_dataset(config.data, data_dir)
  seconds = time.perf_counter() - start
  return pipeline.build_report(builder)["written"]["train"] / seconds


def load_rate(config, workers: int, data_dir: str) -> float:
  config.data.worker_count = workers
  iterator = iter(pipeline.make_train_loader(config, data_dir))
  for _ in range(2 * workers):  # Every worker started and warm.
    next(iterator)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  return _BATCHES.value * config.batch_size / (time.perf_counter() - start)


def paper_example_flops() -> float:
  """FLOPs of one training example of the paper config: forward + backward of the U-Net and
  text encoder, forward of the VAE encoder (XLA's count of the lowered program)."""
  from pixeldance_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from pixeldance_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from pixeldance_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  config = pixeldance.get_config()
  config.batch_size = 1
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.params)
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.frozen)
  data = config.data
  batch = {"video": jax.ShapeDtypeStruct((1, data.frames, data.image_size, data.image_size, 3),
                                         np.uint8),
           "tokens": jax.ShapeDtypeStruct((1, config.text_encoder.max_length), np.int32)}
  grad = jax.grad(lambda p, f, b, r: step_lib.loss_fn(p, f, b, r, config)[0])
  lowered = jax.jit(grad).lower(params, frozen, batch, jax.random.key(0))
  return float(lowered.cost_analysis()["flops"])


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir:
    video_dir = _VIDEO_DIR.value or os.path.join(workdir, "videos")
    if not _VIDEO_DIR.value:
      os.makedirs(video_dir)
      write_synthetic_videos(video_dir, _NUM_VIDEOS.value)
    config = video_config(video_dir)
    print(f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores; clips of "
          f"{_FRAMES.value} frames at {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, 4 fps")
    rates = {}
    for workers in (1, 2):
      rates[f"decode whole videos, {workers} process(es)"] = decode_rate(config, workers)
    data_dir = os.path.join(workdir, "data")
    rates["build (TFDS, 1 process)"] = build_rate(config, data_dir)
    for workers in (1, 2):
      rates[f"load clips, {workers} grain worker(s)"] = load_rate(config, workers, data_dir)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

  tiny_rate = TINY_BATCH / TINY_STEP_SECONDS
  consumers = {"tiny step (CPU, measured)": tiny_rate}
  if _PAPER_FLOPS.value:
    flops = paper_example_flops()
    per_chip = A100_BF16_FLOPS * ASSUMED_MFU / flops  # `flops` counts forward and backward.
    per_host = 8 * per_chip  # A host of 8 chips feeds 8 x 6 = 48 of the 192 clips.
    print(f"paper config: {flops / 1e12:.2f} TFLOP per training example (fwd+bwd); at "
          f"{ASSUMED_MFU:.0%} of an A100's {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s that is "
          f"{per_chip:.2f} clips/s per chip, a step of batch {PAPER_BATCH} on {PAPER_CHIPS} "
          f"chips every {PAPER_BATCH / PAPER_CHIPS / per_chip:.2f} s (estimate, not measured)")
    consumers["paper step, per 8-chip host (estimated)"] = per_host
  print(f"\n{'stage':42s} {'clips/s':>9s}  " + "  ".join(f"x {name}" for name in consumers))
  for stage, rate in rates.items():
    ratios = "  ".join(f"{rate / consumed:>{len(name) + 2}.2f}"
                       for name, consumed in consumers.items())
    print(f"{stage:42s} {rate:9.1f}  {ratios}")
  print("\nA ratio above 1 keeps up with that train step; the build runs once, the load every "
        "step (per host process).")


if __name__ == "__main__":
  app.run(main)
