"""Preemption and exact resume, several processes, gradient accumulation, resume checks.

The process-level tests run train.py as users do (subprocesses on CPU, unit-test config).
"""

import logging
import os
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unit_test
from pixeldance_jax.data import loaders
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.io import checkpoints, tensorboard_files
from pixeldance_jax.train import metrics_logger, trainer
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

import helpers
import mesh_steps
import multi_process_check
import processes
from helpers import ONE_LEVEL_UNET, one_level_flags
from processes import free_port as _free_port, process_group_env

# Multi-process, end-to-end or browser: the full suite's tier (README, Developing).
pytestmark = pytest.mark.slow


def _train_command(workdir, *flags: str) -> list[str]:
  return [sys.executable, "train.py", "--config=configs/unit_test.py", f"--workdir={workdir}",
          *flags]


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_preempted_run_resumes_bitwise_identically(tmp_path, monkeypatch, caplog):
  """SIGTERM mid-run saves and exits; resuming gives the uninterrupted run's state and data.
  And the loop never queues more than two steps ahead of the device, though it fetches
  metrics only every log_every_steps: else a SIGTERM's save (of the step the host is at)
  would wait for every queued step. (The signal is raised in this process, whose main thread
  runs the loop as train.py's does: the handler, the save and the stop are the command's.)"""
  steps = 16
  config = unit_test.get_config()
  config.update_from_flattened_dict(ONE_LEVEL_UNET)  # Resume does not depend on the depth.
  config.num_train_steps = steps
  config.checkpoint_every_steps = 1000  # Only the preemption and the last step save.
  config.log_every_steps = 1000
  unfinished = []  # After each step is queued: how many of the fetched-later steps still run.
  signal_at = []  # The step after which the run below is sent SIGTERM.
  add = metrics_logger.PendingMetrics.add

  def counting_add(self, step, name, metrics):
    add(self, step, name, metrics)
    unfinished.append(sum(not m["finite"].is_ready() for _, _, m in self.pending))
    if step in signal_at:
      signal.raise_signal(signal.SIGTERM)

  monkeypatch.setattr(metrics_logger.PendingMetrics, "add", counting_add)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  # Without the bound the count grows with every step (22 after 24 steps of this model).
  assert len(unfinished) == steps and max(unfinished) <= trainer.MAX_STEPS_IN_FLIGHT == 2, (
      unfinished)

  workdir = tmp_path / "preempted"
  signal_at.append(2)
  previous_handler = signal.getsignal(signal.SIGTERM)
  with caplog.at_level(logging.INFO):
    stopped = trainer.train_and_evaluate(config, str(workdir))
  assert signal.getsignal(signal.SIGTERM) is previous_handler  # Restored.
  saved = checkpoints.make_manager(str(workdir), read_only=True).all_steps()
  assert saved == [int(stopped.step)] and 2 <= saved[0] < steps, saved
  assert "preempted: saved step" in caplog.text

  signal_at.clear()
  resumed = trainer.train_and_evaluate(config, str(workdir))
  assert int(resumed.step) == int(straight.step) == steps
  _assert_trees_equal(resumed, straight)  # params, EMA, Adam moments, step.
  # The data order too: both iterators, restored from their last checkpoints, agree.
  next_batches = []
  for run in ("straight", "preempted"):
    loader = loaders.make_train_loader(config, str(tmp_path / run / "data"))
    iterator = iter(loader)
    manager = checkpoints.make_manager(str(tmp_path / run), read_only=True)
    abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
    checkpoints.restore(manager, steps, abstract, {"data": iterator})
    next_batches.append(next(iterator))
  np.testing.assert_array_equal(next_batches[0]["video"], next_batches[1]["video"])


# --- Two processes train like one -------------------------------------------------------------
#
# train.py runs as 2 processes of 1 CPU device each (jax.distributed on 127.0.0.1, a data 1 x
# fsdp 2 x tensor 1 mesh: the initial weights' restore, the batch, the parameter shards and their
# all-gathers, the gradients' reductions cross processes); this process repeats those steps on
# its one device, from the same initial state and global batches, and then resumes the group's
# checkpoint.
# tests/multi_process_check.py measures the evaluation's feature statistics the same two ways.

SCRIPT = str(pathlib.Path(__file__).resolve().parent / "multi_process_check.py")


@pytest.fixture(scope="module")
def statistics(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
  root = tmp_path_factory.mktemp("multi_process")
  two = str(root / "two.npz")
  address = f"127.0.0.1:{_free_port()}"
  group = processes.ProcessGroup([[sys.executable, SCRIPT, two, address, "2", str(index)]
                                  for index in range(2)], process_group_env(1), root)
  try:
    one = multi_process_check.run(mesh_shape=(1, 1, 1))  # Meanwhile, here.
  finally:
    group.wait()
  return {"two": dict(np.load(two)), "one": one}


def test_the_statistics_runs_have_the_topologies_claimed(statistics):
  assert (int(statistics["two"]["processes"]), int(statistics["two"]["devices"])) == (2, 2)
  assert (int(statistics["one"]["processes"]), int(statistics["one"]["devices"])) == (1, 1)


def test_two_processes_give_the_evaluation_statistics_of_one(statistics):
  """Each process reads its share of the clips; the sums are reduced across the processes."""
  two, one = statistics["two"], statistics["one"]
  assert int(two["skipped"]) == int(one["skipped"]) == 1
  np.testing.assert_allclose(two["feature_mean"], one["feature_mean"], rtol=1e-6)
  # float32 features, rounded per device layout; the covariance's cancellation (means ~0.5,
  # variances ~1e-3) scales that up. A missing or repeated clip moves it by ~10%.
  covariance = one["feature_covariance"]
  np.testing.assert_allclose(two["feature_covariance"], covariance, rtol=0,
                             atol=1e-4 * np.abs(covariance).max())


def _scalars(workdir, tag: str) -> dict[int, float]:
  return tensorboard_files.scalars(str(workdir / "tensorboard"), tag)


def _initial_state(config) -> state_lib.TrainState:
  """The state train.py starts from without `init_from`, on this process's one device."""
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  return state_lib.create_train_state(config, mesh_lib.make_mesh(config.mesh), init_rng)


def _one_device_replay(config, workdir, process_count: int
                       ) -> tuple[list[float], state_lib.TrainState]:
  """(losses, state) of the first `config.num_train_steps` steps that train.py took in
  `workdir` with `process_count` processes, repeated on this process's one device: the same
  initial state (`_initial_state`, which the processes got from `init_from`), the same global
  batches (each process's loader gives its rows, in process order) and the same step rng."""
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  _, train_rng = jax.random.split(jax.random.key(config.seed))
  state = _initial_state(config)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  directory = loaders.data_dir(config, str(workdir))
  per_process = [iter(loaders.make_train_loader(config, directory, index, process_count))
                 for index in range(process_count)]
  losses = []
  for _ in range(config.num_train_steps):
    rows = [next(loader) for loader in per_process]
    batch = {name: np.concatenate([part[name] for part in rows]) for name in rows[0]}
    state, metrics = train_step(state, mesh_lib.global_batch(batch, mesh), train_rng)
    losses.append(float(metrics["loss"]))
  return losses, state


def test_two_processes_train_like_one_and_a_different_topology_resumes(tmp_path, caplog):
  """2 processes x 1 CPU device (mesh fsdp 2: each process holds half of every sharded
  weight) train and checkpoint; this process, with its one device, repeats their steps and
  gets their losses and state, then restores the checkpoint and continues.

  The bounds are those of tests/test_parallel.py's meshes against one device: the sharded sums
  round differently. Losses: 1e-5, ~1e-5 relative on these ~0.6 losses (the two processes'
  rows in the wrong order move them by ~1e-2). State: Adam turns a gradient that is zero in
  exact arithmetic (the text encoder's key bias, which softmax ignores) into float32 noise whose
  update m / (sqrt(v) + eps) is not small, so the params' bound is 1e-4, 3% of what two steps
  at the unit-test learning rate (1e-3) can move a weight; a wrong reduction or batch moves
  weights by O(lr).
  """
  config = unit_test.get_config()
  config.update_from_flattened_dict(ONE_LEVEL_UNET)
  config.num_train_steps = 2
  # The group starts from the initialiser's weights as this process computes them (they do not
  # depend on the mesh), saved as a converted checkpoint: each process restores its shards
  # rather than compiling the sharded initialiser (as costly to compile as a step).
  config.init_from = str(tmp_path / "initial")
  initial = _initial_state(config)
  checkpoints.save_pretrained(config.init_from, initial.params, initial.frozen, config)

  address = f"127.0.0.1:{_free_port()}"
  flags = ["--config.num_train_steps=2", "--config.log_every_steps=1", "--config.mesh.data=1",
           "--config.mesh.fsdp=2", *one_level_flags(), f"--config.init_from={config.init_from}",
           f"--coordinator_address={address}", "--num_processes=2"]
  logs = processes.ProcessGroup(
      [_train_command(tmp_path, *flags, f"--process_id={index}") for index in range(2)],
      process_group_env(1), tmp_path / "logs").wait()
  assert "process 0 of 2; 1 local devices, 2 in all" in logs[0]
  assert "initialised parameters from" in logs[0]
  manager = checkpoints.make_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2]

  losses, replayed = _one_device_replay(config, tmp_path, process_count=2)
  logged = _scalars(tmp_path, "train/loss")
  np.testing.assert_allclose([logged[1], logged[2]], losses, rtol=0, atol=1e-5)
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  saved = checkpoints.restore(manager, 2, abstract)
  found = mesh_steps.max_differences(mesh_steps.flat(jax.device_get(saved)),
                                     mesh_steps.flat(jax.device_get(replayed)))
  for part, atol in (("params", 1e-4), ("ema_params", 1e-4), ("opt_state", 1e-6)):
    difference, where = found[part]
    assert difference <= atol, f"{part} of 2 processes and 1 differ by {difference:.2e} at {where}"
  assert int(saved.step) == 2

  config.num_train_steps = 4
  with caplog.at_level(logging.INFO):
    state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert "resuming from checkpoint step 2" in caplog.text
  assert "the data order restarts" in caplog.text  # 1 process cannot take up 2's order.
  assert "resuming with mesh.fsdp changed: 2 -> 1" in caplog.text
  assert checkpoints.make_manager(str(tmp_path), read_only=True).all_steps() == [2, 4]


def _tags(workdir) -> set[str]:
  return {value.tag for event in tensorboard_files.read_events(str(workdir / "tensorboard"))
          for value in event.summary.value}


def test_the_logger_writes_every_step_by_the_time_training_returns(tmp_path):
  """tensorboardX queues events for a writer thread and its `flush` does not wait for the
  queue: `close` (the trainer's last act) must, or the last steps can be missing on disk."""
  config = unit_test.get_config()
  config.num_train_steps = 300
  logger = metrics_logger.MetricsLogger(str(tmp_path), config)
  for step in range(1, config.num_train_steps + 1):
    logger.log(step, {f"metric_{i}": float(step) for i in range(20)} | {"loss": float(step)})
  logger.close()
  assert sorted(_scalars(tmp_path, "train/loss")) == list(range(1, config.num_train_steps + 1))


def test_the_rates_leave_out_what_is_not_training(tmp_path, monkeypatch):
  """The clock starts at the first step and skips what a preview or an evaluation took."""
  clock = [1000.0]
  monkeypatch.setattr(metrics_logger.time, "time", lambda: clock[0])
  logger = metrics_logger.MetricsLogger(str(tmp_path), unit_test.get_config())
  clock[0] += 50  # Restoring and the loader's start-up: before the clock starts.
  logger.start(1, {})
  clock[0] += 10  # Steps 1-10.
  logger.log(10, {"loss": 1.0})
  clock[0] += 30  # Steps 11-20 and a 20 s preview.
  logger.leave_out(20)
  logger.log(20, {"loss": 1.0})
  logger.close()
  assert _scalars(tmp_path, "train/steps_per_sec") == {10: 1.0, 20: 1.0}


def test_joint_image_training_interleaves_image_steps_and_resumes(tmp_path):
  """Every 2nd step is an image batch (temporal layers off); both iterators are checkpointed;
  the periodic sample lands as a gif."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(ONE_LEVEL_UNET)
  config.data.image_every_k_steps = 2
  config.data.image_batch_size = 4
  config.log_every_steps = 1
  config.sample_every_steps = 4
  config.num_train_steps = 2
  trainer.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps = 4
  state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert {"train/loss", "train/image_loss", "train/clips_per_sec",
          "samples/heldout"} <= _tags(tmp_path)
  assert os.path.isdir(tmp_path / "checkpoints" / "4" / "image_data")
  assert os.path.getsize(tmp_path / "samples" / "step_4.gif") > 0


def _toy_loss(params, frozen, batch, rng, config, use_temporal=True, condition_rates=None):
  """`step_lib.loss_fn`'s signature and metrics on a quadratic in `params["w"]` whose noise
  comes from `rng`: the accumulation's microbatches, folds and means, at no compile cost."""
  del frozen, use_temporal, condition_rates
  video = batch["video"].astype(jnp.float32) / 255
  noise = jax.random.normal(rng, video.shape)
  per_example = jnp.mean((video * params["w"] + noise) ** 2, axis=(1, 2, 3, 4))
  timesteps = batch["tokens"][:, 0] % config.diffusion.num_train_timesteps
  return per_example.mean(), {"loss": per_example.mean(),
                              **step_lib.timestep_buckets(per_example, timesteps, config)}


def test_gradient_accumulation_averages_the_microbatch_gradients():
  """Two microbatches: the mean of their gradients, each with its own fold of the step rng
  (examples i, i + 2, ... in microbatch i); the model's loss takes the same path (traced)."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(ONE_LEVEL_UNET)
  config.batch_size = 4
  rng = np.random.default_rng(0)
  batch = {"video": rng.integers(0, 256, (4, config.data.frames, 16, 16, 3), dtype=np.uint8),
           "tokens": rng.integers(0, 1000, (4, config.text_encoder.max_length), dtype=np.int32)}
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  step_rng = jax.random.key(3)

  def loss_and_grads(accum_steps: int, loss=_toy_loss):
    changed = config.copy_and_resolve_references()
    changed.grad_accum_steps = accum_steps
    return lambda params, b, r: step_lib.loss_and_grads(params, {}, b, r, changed, loss=loss)

  metrics, grads = jax.jit(loss_and_grads(2))(params, batch, step_rng)
  expected_grads, expected_losses = [], []
  for index in range(2):
    microbatch = {key: value[index::2] for key, value in batch.items()}
    micro_metrics, micro_grads = loss_and_grads(1)(params, microbatch,
                                                   jax.random.fold_in(step_rng, index))
    expected_grads.append(micro_grads)
    expected_losses.append(float(micro_metrics["loss"]))
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *expected_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               expected)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(expected_losses), rtol=1e-6)
  assert float(metrics["bucket_count"].sum()) == 4
  model_params = helpers.random_params(config)  # Drawn in numpy; only traced below.
  traced_metrics, traced_grads = jax.eval_shape(
      loss_and_grads(2, step_lib.loss_fn), model_params, batch, step_rng)
  assert jax.tree.structure(traced_grads) == jax.tree.structure(model_params)
  assert traced_metrics["loss"].shape == ()


def test_keep_period_keeps_multiples_beyond_max_to_keep(tmp_path):
  config = unit_test.get_config()
  config.max_checkpoints_to_keep = 1
  config.keep_checkpoint_every_steps = 2
  manager = checkpoints.make_manager(str(tmp_path), config)
  for step in range(1, 6):
    manager.save(step, args=checkpoints.ocp.args.Composite(
        state=checkpoints.ocp.args.StandardSave({"step": np.int32(step)})))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]
