"""Can the input pipeline keep up with training? Clips per second of each data stage.

  python benchmarks/data_throughput.py [--config.data.video_dir=DIR] [--num_videos=16]
      [--batches=24] [--nopaper_flops] [--config.data.image_size=256] [--config.data.frames=16]
      [--config.batch_size=8] (any field of the config: the paper config reading a video
      folder, 32 stored frames a video, 8 clips a loader batch)

1. Build (once per collection): PyAV decode at 4 fps + resize + centre-crop + JPEG encode of
   whole videos, with 1 and 2 decoding processes (`config.data.build_workers`), steady state
   (process start-up excluded); then the whole TFDS build, array_record writing included.
2. Load (every step): the grain loader (read array_record, pick the window, decode its JPEG
   frames, tokenise, batch) with 1 and 2 worker processes (`config.data.worker_count`), after
   every worker has produced a batch.

Each rate is printed beside the clips per second a train step consumes: the tiny config
(`--tiny_step_seconds`, from benchmarks/train_step.py on the same machine) and the paper config, whose step rate is
estimated from the FLOPs of one training example (XLA cost analysis of `step.loss_fn` and its
gradient at batch 1, nothing materialised) at an assumed utilisation of an A100 (the paper
trains batch 192 on 32 A100s). Without `--config.data.video_dir`, synthetic 8 s 320x240 30 fps
mp4s are written to a temporary folder (moving noise: no easier to decode than real footage).
"""

import multiprocessing
import os
import pathlib
import tempfile

import imageio
import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.data import media, loaders
from pixeldance_jax.data.builders import local_videos
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import step as step_lib
from pixeldance_jax.train import throughput

import common


def loader_config() -> ml_collections.ConfigDict:
  """The paper config's data section on a folder of videos, loaded 8 clips at a time."""
  config = common.CONFIGS["paper"]()
  config.data.name = "video_folder"
  config.data.max_stored_frames = 32  # 8 s at 4 fps: the synthetic videos whole.
  config.data.num_test_clips = 0
  config.batch_size = 8  # Clips per loader batch.
  return config


_CONFIG = config_flags.DEFINE_config_dict("config", loader_config(), "Data config; an empty "
                                          "data.video_dir: synthetic videos.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 16, "Synthetic videos to write.")
_BATCHES = flags.DEFINE_integer("batches", 24, "Batches timed per loader setting.")
_PAPER_FLOPS = flags.DEFINE_bool("paper_flops", True, "Estimate the paper step from FLOPs.")

_TINY_STEP_SECONDS = flags.DEFINE_float(
    "tiny_step_seconds", 0.34, "Seconds per configs/tiny.py train step on this machine "
    "(benchmarks/train_step.py --runs=tiny@1x1x1), to compare the loader's rate with.")
TINY_BATCH = 8  # configs/tiny.py's batch_size.
PAPER_CHIPS, CHIPS_PER_HOST = 32, 8  # The paper trains on 32 A100s (4 hosts of 8).
A100_FLOPS, ASSUMED_MFU = dict(throughput.PEAK_FLOPS)["a100"], 0.4


def write_synthetic_videos(folder: str, count: int) -> None:
  rng = np.random.default_rng(0)
  for index in range(count):
    base = rng.integers(0, 255, (240 + 8 * 30, 320 + 8 * 30, 3), np.uint8)
    frames = [base[k:k + 240, k:k + 320] for k in range(8 * 30)]  # Pans 1 px per frame.
    imageio.mimwrite(os.path.join(folder, f"clip{index:03d}.mp4"), frames, fps=30,
                     macro_block_size=1, ffmpeg_log_level="error")
    pathlib.Path(folder, f"clip{index:03d}.txt").write_text(f"synthetic clip {index}")


def decode_rate(config: ml_collections.ConfigDict, workers: int) -> float:
  """Videos per second through `media.encode_video_file` on `workers` warm processes."""
  builder_config = local_videos.LocalVideosConfig.from_config(config.data)
  paths = [entry.path for entry in builder_config.list_entries()]
  arguments = [(path, builder_config.sampling, builder_config.frame_format) for path in paths]
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    pool.starmap(media.encode_video_file, arguments[:workers])  # Start-up, imports.
    _, seconds = common.timed(pool.starmap, media.encode_video_file, arguments, chunksize=1)
  return len(paths) / seconds


def build_rate(config: ml_collections.ConfigDict, data_dir: str) -> float:
  """Videos per second of the whole single-process TFDS build."""
  config.data.build_workers = 0
  builder, seconds = common.timed(loaders.build_dataset, config.data, data_dir)
  return loaders.build_report(builder)["written"]["train"] / seconds


def load_rate(config: ml_collections.ConfigDict, workers: int, data_dir: str) -> float:
  """Clips per second of the train loader with `workers` grain processes, once all are warm."""
  config.data.worker_count = workers
  iterator = iter(loaders.make_train_loader(config, data_dir))
  for _ in range(2 * workers):  # Every worker started and warm.
    next(iterator)
  seconds = sum(common.run_seconds(lambda: next(iterator), _BATCHES.value))
  return _BATCHES.value * config.batch_size / seconds


def measure_rates(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Clips (decode, build: videos) per second of each data stage, on `config.data.video_dir`."""
  rates = {}
  for workers in (1, 2):
    rates[f"decode whole videos, {workers} process(es)"] = decode_rate(config, workers)
  data_dir = os.path.join(workdir, "data")
  rates["build (TFDS, 1 process)"] = build_rate(config, data_dir)
  for workers in (1, 2):
    rates[f"load clips, {workers} grain worker(s)"] = load_rate(config, workers, data_dir)
  return rates


def paper_example_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training example: forward + backward of the U-Net and text encoder, forward
  of the VAE encoder (XLA's count of the lowered program)."""
  params, frozen = pixeldance.abstract_weights(config, mesh_lib.make_mesh(config.mesh))
  batch = common.batch_shapes(config, 1)
  grad = jax.grad(lambda p, f, b, r: step_lib.loss_fn(p, f, b, r, config)[0])
  return common.flops_of(grad, params, frozen, batch, jax.random.key(0))


def paper_step_rate() -> float:
  """Clips per second an 8-chip host consumes in the paper's training (estimated); prints how."""
  config = common.CONFIGS["paper"]()
  flops = paper_example_flops(config)
  per_chip = A100_FLOPS * ASSUMED_MFU / flops  # `flops` counts forward and backward.
  print(f"paper config: {flops / 1e12:.2f} TFLOP per training example (fwd+bwd); at "
        f"{ASSUMED_MFU:.0%} of an A100's {A100_FLOPS / 1e12:.0f} TFLOP/s that is "
        f"{per_chip:.2f} clips/s per chip, a step of batch {config.batch_size} on {PAPER_CHIPS} "
        f"chips every {config.batch_size / PAPER_CHIPS / per_chip:.2f} s (estimate, not measured)")
  return CHIPS_PER_HOST * per_chip  # A host of 8 chips feeds 8 x 6 = 48 of the 192 clips.


def print_table(rates: dict[str, float], consumers: dict[str, float]) -> None:
  """Each stage's rate and its ratio to each consumer's clips per second."""
  columns = [("stage", -42, ""), ("clips/s", 9, ".1f")]
  columns += [(f"x {name}", len(name) + 3, ".2f") for name in consumers]
  print("\n" + common.header_line(columns))
  for stage, rate in rates.items():
    print(common.row_line(columns, [stage, rate, *(rate / c for c in consumers.values())]))
  print("\nA ratio above 1 keeps up with that train step; the build runs once, the load every "
        "step (per host process).")


def main(argv):
  del argv
  common.start_jax(platform="cpu")  # Only XLA's FLOP count of the paper step: on the CPU.
  config = _CONFIG.value.copy_and_resolve_references()
  data = config.data
  data.max_stored_frames = max(data.max_stored_frames, data.frames)
  print(f"{common.machine_summary()}; clips of {data.frames} frames at "
        f"{data.image_size}x{data.image_size}, {data.fps} fps")
  with tempfile.TemporaryDirectory() as workdir:
    if not data.video_dir:
      data.video_dir = os.path.join(workdir, "videos")
      os.makedirs(data.video_dir)
      write_synthetic_videos(data.video_dir, _NUM_VIDEOS.value)
    rates = measure_rates(config, workdir)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {common.cpu_cores()} cores")
  consumers = {"tiny step (CPU, --tiny_step_seconds)": TINY_BATCH / _TINY_STEP_SECONDS.value}
  if _PAPER_FLOPS.value:
    consumers["paper step, per 8-chip host (estimated)"] = paper_step_rate()
  print_table(rates, consumers)


if __name__ == "__main__":
  console.run(main)
