"""Train step, checkpoints, resume and failure handling on the unit-test config."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
import helpers
from configs import unit_test
from pixeldance_jax.data import loaders
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.io import checkpoints
from pixeldance_jax.runtime import errors
from pixeldance_jax.train import config_checks
from pixeldance_jax.train import trainer
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib


def _fixed_batch(config, data_dir):
  loader = loaders.make_train_loader(config, data_dir)
  return next(iter(loader))


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_loss_decreases_on_a_fixed_batch(tmp_path):
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  config.learning_rate = 3e-3
  config.warmup_steps = 1
  config.num_train_steps = 10**6  # The cosine stays at its peak for these 30 steps.
  mesh = mesh_lib.make_mesh(config.mesh)
  state = state_lib.create_train_state(config, mesh, jax.random.key(0))
  _, shardings = state_lib.abstract_state(config, mesh)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  batch = mesh_lib.global_batch(_fixed_batch(config, str(tmp_path)), mesh)
  # The same rng every step: the same noise and timesteps, so the loss is comparable.
  losses = []
  for _ in range(30):
    state, metrics = train_step(state.replace(step=state.step * 0), batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.mark.slow
def test_a_non_finite_step_leaves_the_whole_state_unchanged(tmp_path):
  """The step's guard (`lax.cond` on a finite loss and gradient norm) keeps every array, the
  optimiser's and the EMA's too, and the step count; a finite step moves them."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  train_step = step_lib.jit_train_step(config, mesh, shardings)
  batch = mesh_lib.global_batch(_fixed_batch(config, str(tmp_path)), mesh)
  state = state_lib.create_train_state(config, mesh, jax.random.key(0))
  state, metrics = train_step(state, batch, jax.random.key(1))
  assert bool(metrics["finite"]) and int(state.step) == 1
  leaves, treedef = jax.tree.flatten(state.params)
  poisoned = state.replace(params=jax.tree.unflatten(
      treedef, [leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)] + leaves[1:]))
  expected = jax.tree.map(np.asarray, poisoned)  # The step donates its input.
  after, metrics = train_step(poisoned, batch, jax.random.key(1))
  assert not bool(metrics["finite"])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), after, expected)


@pytest.mark.slow
def test_the_separate_update_program_is_the_fused_step(tmp_path):
  """`config.separate_update` (gradients, then the update, as two programs) computes what one
  program does, a skipped non-finite step included; both donate the state; the video and image
  steps share the update program."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  batch = mesh_lib.global_batch(_fixed_batch(config, str(tmp_path)), mesh)
  results = {}
  for separate in (True, False):
    config.separate_update = separate
    train_step = step_lib.jit_train_step(config, mesh, shardings)
    assert train_step.program_names == (("gradients", "update") if separate else ("step",))
    state = state_lib.create_train_state(config, mesh, jax.random.key(0))
    history = []
    for step in range(3):
      if step == 1:  # A non-finite step: skipped, then the weight restored.
        leaves, treedef = jax.tree.flatten(state.params)
        kept = np.asarray(leaves[0])
        state = state.replace(params=jax.tree.unflatten(
            treedef, [leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)] + leaves[1:]))
      moments = jax.tree.leaves(state.opt_state)
      state, metrics = train_step(state, batch, jax.random.key(1))
      assert all(leaf.is_deleted() for leaf in moments), "the state is donated"
      history.append(jax.tree.map(np.asarray, metrics))
      if step == 1:
        leaves, treedef = jax.tree.flatten(state.params)
        state = state.replace(params=jax.tree.unflatten(
            treedef, [jax.device_put(kept, leaves[0].sharding)] + leaves[1:]))
    results[separate] = (jax.tree.map(np.asarray, state), history)
  assert [bool(m["finite"]) for m in results[True][1]] == [True, False, True]
  _assert_trees_equal(results[True], results[False])
  config.separate_update = True
  video = step_lib.jit_train_step(config, mesh, shardings)
  image = step_lib.jit_train_step(config, mesh, shardings, use_temporal=False)
  assert video._programs["update"] is image._programs["update"]
  assert video._programs["gradients"] is not image._programs["gradients"]


@pytest.mark.parametrize("schedule,warmup", [("cosine", 10), ("cosine", 0), ("constant", 10)])
def test_learning_rate_schedule_is_optax_warmup_then_decay(schedule, warmup):
  config = unit_test.get_config()
  config.lr_schedule, config.warmup_steps, config.num_train_steps = schedule, warmup, 100
  config.learning_rate = 2e-3
  after = (optax.cosine_decay_schedule(2e-3, 100 - warmup) if schedule == "cosine"
           else optax.constant_schedule(2e-3))
  expected = optax.join_schedules([optax.linear_schedule(0.0, 2e-3, max(warmup, 1)), after],
                                  [warmup])
  steps = np.arange(0, 120)
  found = jax.jit(jax.vmap(state_lib.learning_rate_schedule(config)))(steps)
  np.testing.assert_allclose(found, jax.vmap(expected)(steps), rtol=1e-6, atol=2e-3 * 1e-6)


@pytest.mark.slow
def test_optimiser_numbers_do_not_change_the_program():
  """Learning rate, schedule length, Adam and EMA numbers are traced: one compiled step."""
  def program(**changes):
    config = unit_test.get_config()
    config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
    config.update(changes)
    mesh = mesh_lib.make_mesh(config.mesh)
    abstract, shardings = state_lib.abstract_state(config, mesh)
    batch = {"video": jax.ShapeDtypeStruct((config.batch_size, config.data.frames,
                                            config.data.image_size, config.data.image_size, 3),
                                           np.uint8),
             "tokens": jax.ShapeDtypeStruct((config.batch_size, config.text_encoder.max_length),
                                            np.int32)}
    lowered = step_lib.jit_train_step(config, mesh, shardings).lower(abstract, batch,
                                                                   jax.random.key(0))
    return [program.as_text(debug_info=False) for program in lowered.values()]
  reference = program()
  assert program(num_train_steps=123, learning_rate=0.5, warmup_steps=7, ema_decay=0.5,
                 adam_b2=0.9, weight_decay=0.1, grad_clip_norm=3.0) == reference
  assert program(lr_schedule="constant") != reference


@pytest.mark.slow
def test_checkpoint_round_trip_is_exact(tmp_path):
  config = unit_test.get_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  _, shardings = state_lib.abstract_state(config, mesh)
  # Numpy-drawn weights (no initialiser to compile); EMA and moments made to differ from them.
  params = jax.device_put(helpers.random_params(config), shardings.params)
  state = state_lib.state_from_weights(config, mesh, params, {})
  state = state.replace(step=state.step + 7,
                        ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params),
                        opt_state=jax.tree.map(lambda x: x + 2, state.opt_state))
  iterator = iter(loaders.make_train_loader(config, str(tmp_path / "data")))
  next(iterator)
  manager = checkpoints.make_manager(str(tmp_path), config)
  checkpoints.save(manager, 7, state, config, {"data": iterator})
  manager.wait_until_finished()
  expected_next = next(iterator)

  fresh_iterator = iter(loaders.make_train_loader(config, str(tmp_path / "data")))
  abstract, _ = state_lib.abstract_state(config, mesh)
  restored = checkpoints.restore(manager, 7, abstract, {"data": fresh_iterator})
  _assert_trees_equal(restored, state)
  np.testing.assert_array_equal(next(fresh_iterator)["video"], expected_next["video"])
  assert checkpoints.restore_config(manager, 7).unet.block_out_channels == [16, 32]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  config.learning_rate = 1e30  # Adam moves every weight by ~1e30: the next loss is not finite.
  config.warmup_steps = 0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  with pytest.raises(FloatingPointError, match="step 2"):
    trainer.train_and_evaluate(config, str(tmp_path))
  manager = checkpoints.make_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [1]
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = state_lib.abstract_state(config, mesh)
  restored = checkpoints.restore(manager, 1, abstract)
  assert int(restored.step) == 1


def test_restore_without_checkpoint_names_the_path(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path), read_only=True)
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    checkpoints.latest_step(manager, str(tmp_path))


def test_config_checks_name_each_bad_choice_before_any_work(tmp_path):
  config = unit_test.get_config()
  config.diffusion.prediction_type = "eps"
  config.sample.sampler = "ddmi"
  config.unet.remat_policy = "dots"
  with pytest.raises(errors.ConfigError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert str(error.value).splitlines() == [
      "config.unet.remat_policy='dots' is not one of ['dots_saveable', "
      "'dots_with_no_batch_dims_saveable', 'everything_saveable', 'full', 'none', "
      "'nothing_saveable']; did you mean 'dots_saveable'?",
      "config.diffusion.prediction_type='eps' is not one of ['epsilon', 'sample', "
      "'sample_skip', 'v_prediction']; did you mean 'epsilon'?",
      "config.sample.sampler='ddmi' is not one of ['ddim', 'ddpm', 'dpmpp_2m']; did you mean "
      "'ddim'?"]
  assert not (tmp_path / "data").exists()  # Failed before building the dataset.

  config = unit_test.get_config()
  config.lr_schedule = "linear"
  config.batch_size = 3
  config.grad_accum_steps = 2
  config.diffusion.min_snr_gamma = -5.0
  with pytest.raises(ValueError, match="lr_schedule='linear'.*\n.*batch_size=3 is not divisible"
                     ".*\n.*min_snr_gamma=-5.0 must be >= 0"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("name", sorted(path.stem for path in pathlib.Path(
    configs.__file__).parent.glob("*.py") if path.stem != "__init__"))
def test_every_shipped_config_passes_the_config_checks(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.check(config, fresh_start=False)  # The paper's KL autoencoder needs init_from.


def _workdir_with_checkpoint(tmp_path, config):
  manager = checkpoints.make_manager(str(tmp_path), config)
  checkpoints.save(manager, 1, {"step": np.int32(1)}, config)
  manager.wait_until_finished()
  return manager


def test_resuming_with_other_data_conditioning_or_seed_is_refused_before_the_data_is_built(
    tmp_path):
  config = unit_test.get_config()
  manager = _workdir_with_checkpoint(tmp_path, config)
  changed = config.copy_and_resolve_references()
  changed.data.num_train_clips = 64
  changed.conditioning.last_frame_drop_prob = 0.123
  changed.seed = 3
  changed.data.worker_count = 1  # How the same examples are loaded: free.
  changed.num_train_steps = 8  # A longer schedule: free.
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  for line in ("data.num_train_clips: checkpoint 32, config 64",
               "conditioning.last_frame_drop_prob: checkpoint ", "seed: checkpoint 0, config 3",
               "--allow_resume_changes=conditioning.last_frame_drop_prob,"
               "data.num_train_clips,seed"):
    assert line in message, message
  assert "worker_count" not in message and "num_train_steps" not in message, message
  assert not (tmp_path / "data").exists()  # Refused before the dataset was built.
  # Asked for, by key or by section, the changes are taken (and reported).
  taken = checkpoints.check_resume_config(
      manager, 1, changed, allow=("data", "conditioning.last_frame_drop_prob", "seed"))
  assert {key for key, _, _ in taken} >= {"data.num_train_clips", "seed", "num_train_steps"}


def test_resuming_with_another_model_is_refused_before_the_data_is_built(tmp_path):
  config = unit_test.get_config()
  _workdir_with_checkpoint(tmp_path, config)
  config.unet.block_out_channels = (16, 48)
  config.text_encoder.num_layers = 2
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(config, str(tmp_path), allow_resume_changes=("unet",))
  message = str(error.value)
  assert "unet.block_out_channels: checkpoint [16, 32], config (16, 48)" in message, message
  assert "text_encoder.num_layers: checkpoint 1, config 2" in message, message
  assert str(tmp_path) in message and not (tmp_path / "data").exists()


def test_a_checkpoint_from_before_a_key_was_added_resumes_with_its_old_value(tmp_path):
  """A key added to the config since a checkpoint was written is read at the value that
  reproduces that checkpoint (`ADDED_KEYS`): the same model resumes, another is refused."""
  config = unit_test.get_config()
  older = config.copy_and_resolve_references()
  for key in checkpoints.ADDED_KEYS:
    section, name = key.split(".")
    del older[section][name]
  manager = _workdir_with_checkpoint(tmp_path, older)
  restored = checkpoints.restore_config(manager, 1)
  for key, value in checkpoints.ADDED_KEYS.items():
    section, name = key.split(".")
    assert restored[section][name] == value, key
  assert not [d for d in checkpoints.check_resume_config(manager, 1, config)
              if d[0].split(".")[0] in checkpoints.MODEL_SECTIONS]
  config.diffusion.min_snr_gamma = 5.0
  with pytest.raises(ValueError, match="diffusion.min_snr_gamma: checkpoint 0.0, config 5.0"):
    checkpoints.check_resume_config(manager, 1, config)


def test_init_from_weights_of_another_dtype_or_shape_is_refused(tmp_path):
  config = unit_test.get_config()
  abstract, _ = state_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), helpers.random_params(config))
  params["unet"]["conv_in"]["kernel"] = params["unet"]["conv_in"]["kernel"].astype(
      jnp.bfloat16)
  params["unet"]["conv_out"]["bias"] = params["unet"]["conv_out"]["bias"][:2]
  checkpoints.save_pretrained(str(tmp_path), params, {}, config)
  with pytest.raises(ValueError) as error:
    checkpoints.restore_pretrained(str(tmp_path), abstract.params, abstract.frozen)
  message = str(error.value)
  assert "does not fit this config's model (config.init_from)" in message, message
  assert "['unet']['conv_in']['kernel']: bfloat16, expected float32" in message, message
  assert "['unet']['conv_out']['bias']: (2,), expected" in message, message


def test_a_writer_removes_unfinished_checkpoint_folders(tmp_path, caplog):
  config = unit_test.get_config()
  manager = _workdir_with_checkpoint(tmp_path, config)
  unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1733400000000000"
  (unfinished / "state").mkdir(parents=True)
  checkpoints.make_manager(str(tmp_path), read_only=True)  # A reader leaves it.
  assert unfinished.exists()
  with caplog.at_level("WARNING"):
    manager = checkpoints.make_manager(str(tmp_path), config)
  assert not unfinished.exists() and manager.all_steps() == [1]
  assert "removed 1 unfinished checkpoint folder(s)" in caplog.text
