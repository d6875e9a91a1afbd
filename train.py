"""Trains PixelDance: `python train.py --config=configs/tiny.py --workdir=/tmp/run`.

Several processes (TPU pod slices, multi-GPU or multi-node clusters): pass `--distributed` to let
`jax.distributed.initialize` find the cluster (TPU, SLURM, Open MPI, Kubernetes), or give
`--coordinator_address`, `--num_processes` and `--process_id` explicitly.

The console shows progress only (`--log_level=info` adds the libraries' own lines); a
misspelled `--config.` key or an impossible config value is a one-line error.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, config.json.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detected "
    "settings (TPU pods, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (with --num_processes "
    "and --process_id) for clusters JAX does not detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_ALLOW_RESUME_CHANGES = flags.DEFINE_list(
    "allow_resume_changes", [], "Config keys or sections (of conditioning, data, seed) that may "
    "differ from the checkpoint's when resuming, e.g. data.num_train_clips,conditioning. "
    "Without them such a change is refused; model settings can never change.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the multi-process job described by the flags; nothing for a single process."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go "
                           "together; got " + ", ".join(map(repr, explicit)))
    jax.distributed.initialize(*explicit)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d; %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  initialize_distributed()
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_RESUME_CHANGES.value)


if __name__ == "__main__":
  console.run(main, reuse_freed_memory=True)
