"""Orbax checkpoints: train state (params, EMA, optimiser, step), config and data iterator."""

import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest `config.max_checkpoints_to_keep`; saves asynchronously."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep if config else None,
      create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, data_iterator: Any | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def latest_step(manager: ocp.CheckpointManager, workdir: str) -> int:
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}: train first, "
                            f"or point --workdir at a directory that train.py wrote.")
  return step


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with."""
  restored = _restore(manager, step, {"config": ocp.args.JsonRestore()})
  return ml_collections.ConfigDict(restored["config"])


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> Any:
  """Restores the state onto the shardings in `abstract_state` (any mesh), and the iterator."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return _restore(manager, step, items)["state"]


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
  restored = _restore(manager, step, {"pretrained": ocp.args.StandardRestore(target)})
  return restored["pretrained"]["params"], restored["pretrained"]["frozen"]
