"""Orbax checkpoints: train state (params, EMA, optimiser, step), config and data iterator.

Training saves and restores the whole state (`save`, `restore`); sampling reads only weights
(`restore_weights`): the params or the EMA params, and the frozen weights, of a training
checkpoint (never the optimiser state, twice the params' size), or a converted checkpoint's.
"""

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from pixeldance_jax.io import mismatch


_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step still being written.


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest `config.max_checkpoints_to_keep`, and for good every step that is a
  multiple of `config.keep_checkpoint_every_steps` (when > 0); saves asynchronously."""
  keep_period = config.keep_checkpoint_every_steps if config else 0
  directory = checkpoint_dir(workdir)
  if not read_only:
    _remove_unfinished(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep if config else None,
      keep_period=keep_period or None,
      create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(directory, options=options)


def _remove_unfinished(directory: str) -> None:
  """Removes the temporary folders of steps whose save never finished (a run stopped while
  saving); process 0 only, as it alone finalises saves."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  unfinished = sorted(name for name in os.listdir(directory) if _TMP_SUFFIX in name)
  for name in unfinished:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if unfinished:
    logging.warning("removed %d unfinished checkpoint folder(s) in %s (a run stopped while "
                    "saving): %s", len(unfinished), directory, ", ".join(unfinished))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, iterators: Mapping[str, Any] | None = None) -> None:
  """State, config and the data iterators' states (one item each: "data", "image_data")."""
  items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
  for name, iterator in (iterators or {}).items():
    items[name] = grain.checkpoint.CheckpointSave(iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def latest_step(manager: ocp.CheckpointManager, workdir: str) -> int:
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}: train first, "
                            f"or point --workdir at a directory that train.py wrote.")
  return step


# Config keys added after checkpoints had been written without them, each with the value that
# reproduces what such a checkpoint was trained (or sampled) with.
ADDED_KEYS = {
    "conditioning.keyframe_mask": False,
    "conditioning.keyframe_max_count": 1,
    "conditioning.keyframe_prob": 0.0,
    "conditioning.leading_frames_prob": 0.0,
    "conditioning.max_leading_frames": 2,
    "diffusion.min_snr_gamma": 0.0,
    "sample.guidance_rescale": 0.0,
    "sample.sampler": "ddim",
    "text_encoder.use_penultimate_layer": False,
    "unet.input_skip": "none",
    "unet.kernels": "auto",
    "unet.refiner_channels": 0,
}


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with, a key added since (`ADDED_KEYS`) at its value
  for the checkpoint, so that resuming and sampling see the config whole."""
  restored = _restore(manager, step, {"config": ocp.args.JsonRestore()})
  config = restored["config"]
  for key, value in ADDED_KEYS.items():
    section, name = key.split(".")
    if section in config and name not in config[section]:
      config[section][name] = value
  return ml_collections.ConfigDict(config)


def find_config(workdir: str, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
  """(step, its config) of the latest (or the given) checkpoint of a training workdir or a
  converted checkpoint directory; FileNotFoundError naming what exists when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}: train first, or point "
                            f"--workdir at a directory that train.py or pixeldance_jax.convert "
                            f"wrote.")
  manager = make_manager(workdir, read_only=True)
  try:
    step = latest_step(manager, workdir) if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                              f"there are {sorted(manager.all_steps())}.")
    return step, restore_config(manager, step)
  finally:
    manager.close()


def has_data_state(manager: ocp.CheckpointManager, step: int, name: str, process_index: int,
                   process_count: int) -> bool:
  """Whether checkpoint `step` holds this process's state of data iterator `name`.

  grain writes one file per process, so a run restarted with another number of processes
  cannot take up the old data order.
  """
  return os.path.exists(os.path.join(str(manager.directory), str(step), name,
                                     f"process_{process_index}-of-{process_count}.json"))


# Config sections that shape the parameters or what they mean: a checkpoint trained with other
# values cannot be resumed with these.
MODEL_SECTIONS = ("unet", "text_encoder", "autoencoder", "diffusion")
# What the run trains on and how its conditions are drawn: resuming with other values changes
# the experiment half way, so it needs to be asked for (`allow`). Data keys that only say how
# the same examples are loaded are free.
RUN_SECTIONS = ("conditioning", "data", "seed")
LOADING_KEYS = ("data.worker_count", "data.build_workers")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
                       ) -> list[tuple[str, Any, Any]]:
  """(dotted key, saved value, current value) for every leaf that differs or exists in one."""
  differences = []
  for key in sorted(set(saved) | set(current)):
    name, old, new = prefix + key, saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(old, Mapping) and isinstance(new, Mapping):
      differences.extend(config_differences(old, new, name + "."))
    elif _normalise(old) != _normalise(new):
      differences.append((name, old, new))
  return differences


def _normalise(value: Any) -> Any:
  """JSON turns tuples into lists: compare them as equal."""
  return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_resume_config(manager: ocp.CheckpointManager, step: int,
                        config: ml_collections.ConfigDict, allow: Sequence[str] = ()
                        ) -> list[tuple[str, Any, Any]]:
  """The differences between the checkpoint's config and `config` that resuming may take (a
  longer schedule, another mesh, ...). Raises ValueError naming each key where the model
  sections differ, and where the run sections (conditioning, data, seed) differ unless the key
  or its section is in `allow`."""
  saved = restore_config(manager, step).to_dict()
  differences = config_differences(saved, config.to_dict())
  where = os.path.join(str(manager.directory), str(step))
  model = [d for d in differences if d[0].split(".")[0] in MODEL_SECTIONS]
  if model:
    raise ValueError(f"The config does not match the model in checkpoint {where}:\n"
                     f"{_listing(model)}\nUse the checkpoint's config (config.json in the "
                     "workdir), or a new --workdir to train a different model.")
  allowed = lambda key: key in allow or key.split(".")[0] in allow or key in LOADING_KEYS
  run = [d for d in differences if d[0].split(".")[0] in RUN_SECTIONS and not allowed(d[0])]
  if run:
    keys = ",".join(key for key, _, _ in run)
    raise ValueError(f"The config changes what checkpoint {where} was trained on:\n"
                     f"{_listing(run)}\nUse the checkpoint's config (config.json in the "
                     f"workdir), a new --workdir, or resume with these changes on purpose: "
                     f"--allow_resume_changes={keys}")
  return differences


def _listing(differences: list[tuple[str, Any, Any]]) -> str:
  return "\n".join(f"  {key}: checkpoint {old!r}, config {new!r}"
                   for key, old, new in differences)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            iterators: Mapping[str, Any] | None = None) -> Any:
  """Restores the state onto the shardings in `abstract_state` (any mesh), and the named
  data iterators in place."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  for name, iterator in (iterators or {}).items():
    items[name] = grain.checkpoint.CheckpointRestore(iterator)
  return _restore(manager, step, items)["state"]


def restore_iterators(manager: ocp.CheckpointManager, step: int,
                      iterators: Mapping[str, Any]) -> None:
  """Restores only the named data iterators (made after the state, e.g. the latent cache's)."""
  if iterators:
    _restore(manager, step, {name: grain.checkpoint.CheckpointRestore(iterator)
                             for name, iterator in iterators.items()})


def _restore(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> Any:
  path = os.path.join(str(manager.directory), str(step))
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
    raise RuntimeError(f"Could not restore {sorted(items)} from checkpoint {path}: "
                       f"{type(error).__name__}: {error}") from error


# --- Pretrained (converted) checkpoints -------------------------------------------------------
# Written by `python -m pixeldance_jax.convert` as step 0 of a CheckpointManager directory with
# the items "pretrained" ({"params": trainable, "frozen": frozen weights}) and "config".


def save_pretrained(directory: str, params: Any, frozen: Any,
                    config: ml_collections.ConfigDict) -> None:
  manager = make_manager(directory)
  if manager.latest_step() is not None:
    raise FileExistsError(f"{checkpoint_dir(directory)} already holds checkpoints "
                          f"{manager.all_steps()}; choose an empty output directory.")
  manager.save(0, args=ocp.args.Composite(
      pretrained=ocp.args.StandardSave({"params": params, "frozen": frozen}),
      config=ocp.args.JsonSave(config.to_dict())))
  manager.wait_until_finished()


def is_pretrained(manager: ocp.CheckpointManager, step: int) -> bool:
  """True for a converted checkpoint (no optimiser state), False for a training one."""
  return os.path.isdir(os.path.join(str(manager.directory), str(step), "pretrained"))


def restore_pretrained(directory: str, abstract_params: Any, abstract_frozen: Any
                       ) -> tuple[Any, Any]:
  """(params, frozen) of a converted checkpoint, restored onto the given shardings."""
  manager = make_manager(directory, read_only=True)
  step = latest_step(manager, directory)
  if not is_pretrained(manager, step):
    raise ValueError(f"{checkpoint_dir(directory)}/{step} is not a converted checkpoint "
                     f"(python -m pixeldance_jax.convert writes those).")
  target = {"params": abstract_params, "frozen": abstract_frozen}
  _check_fits(directory, step, "pretrained", target, "does not fit this config's model "
              "(config.init_from)")
  restored = _restore(manager, step, {"pretrained": ocp.args.StandardRestore(target)})
  return restored["pretrained"]["params"], restored["pretrained"]["frozen"]


# --- Weights only (sampling) ------------------------------------------------------------------


def _check_fits(workdir: str, step: int, item: str, expected: dict[str, Any],
                what: str = "does not fit the model its own config describes") -> None:
  """Refuses, listing what differs (`mismatch.check`), a checkpoint whose arrays do not fit
  the model in shape or dtype: cheaper and clearer than Orbax failing mid-restore, or casting
  without a word. Arrays the model does not read (the optimiser's) are not checked."""
  item_dir = os.path.join(checkpoint_dir(workdir), str(step), item)
  try:
    metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
  except (OSError, ValueError) as error:
    raise ValueError(f"Cannot read the metadata of checkpoint item {item_dir}: {error}") from error
  leaves = lambda tree: {jax.tree_util.keystr(path): leaf
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  wanted, stored = leaves(expected), leaves(metadata)
  missing, _, misshapen = mismatch.compare(  # Leaves it has beyond: not read.
      {name: leaf.shape for name, leaf in wanted.items()},
      {name: leaf.shape for name, leaf in stored.items()})
  other_dtype = sorted(f"{name}: {stored[name].dtype}, expected {leaf.dtype}"
                       for name, leaf in wanted.items()
                       if name in stored and getattr(stored[name], "dtype", None) is not None
                       and stored[name].dtype != leaf.dtype)
  mismatch.check(f"Checkpoint {step} in {checkpoint_dir(workdir)} {what}", missing, (),
                 misshapen, (("of another dtype", other_dtype),))


def _restore_subtrees(manager: ocp.CheckpointManager, step: int, item: str,
                      target: dict[str, Any]) -> dict[str, Any]:
  """Reads only the subtrees of `item` named in `target` (ShapeDtypeStructs with shardings):
  an Orbax partial restore, so the arrays left out (the optimiser state) are never read."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
  return _restore(manager, step, {item: args})[item]


def restore_weights(workdir: str, step: int, abstract_params: Any, abstract_frozen: Any,
                    use_ema: bool = True) -> tuple[Any, Any, str]:
  """(params, frozen, kind) of checkpoint `step` of `workdir`, onto the shardings of the
  abstract trees (`models.pixeldance.abstract_weights`, any mesh).

  A training checkpoint gives its EMA params (`use_ema`, kind "ema") or its raw params ("raw"),
  and its frozen weights; the optimiser state is not read. A converted checkpoint has one set
  of weights (kind "converted"). Arrays whose shapes differ from the abstract ones are listed
  (ValueError) before anything is read.
  """
  manager = make_manager(workdir, read_only=True)
  try:
    if is_pretrained(manager, step):
      if not use_ema:
        logging.info("A converted checkpoint has one set of weights; raw weights change nothing.")
      target = {"params": abstract_params, "frozen": abstract_frozen}
      _check_fits(workdir, step, "pretrained", target)
      restored = _restore_subtrees(manager, step, "pretrained", target)
      return restored["params"], restored["frozen"], "converted"
    name = "ema_params" if use_ema else "params"
    target = {name: abstract_params, "frozen": abstract_frozen}
    _check_fits(workdir, step, "state", target)
    restored = _restore_subtrees(manager, step, "state", target)
    return restored[name], restored["frozen"], "ema" if use_ema else "raw"
  finally:
    # Orbax's I/O threads otherwise race the interpreter's exit after a failed restore
    # ("RuntimeError: Event loop is closed" printed after the real error).
    manager.close()
