"""Builds a config's datasets (and reports skipped inputs) without training.

  python -m pixeldance_jax.data.build --config=configs/tiny.py --workdir=workdirs/mine \
      --config.data.name=video_folder --config.data.video_dir=my_videos

Writes the same files `train.py` would build on its first run, under `config.data.data_dir`
or `<workdir>/data`: the video dataset and, with joint image training from `image_folder`, the
image dataset. Re-running is a no-op.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.data import loaders

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (its data/ folder).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  data_dir = loaders.data_dir(config, _WORKDIR.value)
  data_configs = [config.data]
  if config.data.image_every_k_steps and config.data.image_dataset in loaders.IMAGE_DATASETS:
    data_configs.append(loaders.image_data_config(config))
  for data_config in data_configs:
    builder = loaders.build_dataset(data_config, data_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    logging.info("%s: %s at %s", data_config.name, splits, builder.data_dir)
    report = loaders.build_report(builder)
    if report:
      print(json.dumps({"dataset": builder.data_dir, **report}, indent=2))


if __name__ == "__main__":
  console.run(main)
