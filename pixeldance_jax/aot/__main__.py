"""Will this run fit, and how? Compiles what train.py and sample.py would run on a TPU slice,
ahead of time, on this host (no TPU needed; libtpu's compiler: `pip install -e ".[tpu]"`), and
prints, per device, the compiler's memory plan against the chip's HBM, TFLOP and bytes per step,
the collectives by kind and the compile time.

  python -m pixeldance_jax.aot --config=configs/pixeldance.py --topology=v5p-64 \\
      [--config.mesh.fsdp=8] [--config.batch_size=64] [--config.unet.remat_policy=full] \\
      [--programs=train_step,sample] [--json=plan.json]
  # The largest batch per chip that fits, per remat policy:
  python -m pixeldance_jax.aot --config=configs/pixeldance.py --topology=v5p-8 --sweep \\
      [--policies=none,dots_saveable,full]

`--config.batch_size` is the global batch, as for train.py; `--per_chip=N` sets it to N clips
per data-parallel chip instead. Exit status: 0 when every program fits its chip, 1 when one does
not, 2 for a bad command line.
"""

import dataclasses
import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.runtime import errors
from pixeldance_jax.aot import topology

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: Cloud TPU's name (v5p-64, "
                                "v4-8, v5e-8, v6e-16) or libtpu's (v5p:2x4x4).")
_PROGRAMS = flags.DEFINE_list("programs", ["train_step", "image_step", "update", "sample"],
                              "Programs to compile: train_step (its gradients' program with "
                              "config.separate_update), image_step (only with joint image "
                              "training, data.image_every_k_steps), update (only with "
                              "config.separate_update) and sample.")
_PER_CHIP = flags.DEFINE_integer("per_chip", 0, "Clips per data-parallel chip (sets "
                                 "config.batch_size); 0: the config's batch_size.")
_SAMPLE_PER_CHIP = flags.DEFINE_integer("sample_per_chip", 1, "Videos per data-parallel chip "
                                        "in the sampling program.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per chip to plan against, GiB (e.g. to "
                               "keep headroom for other work); 0: the chip's HBM.")
_JSON = flags.DEFINE_string("json", "", "Also write the report here as JSON.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Also write each program's optimized HLO here.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Find the largest clips per chip whose train step "
                           "fits, for each of --policies.")
_POLICIES = flags.DEFINE_list("policies", ["none", "dots_saveable", "full"], "Remat policies "
                              "(config.unet.remat_policy) for --sweep.")
_MAX_PER_CHIP = flags.DEFINE_integer("max_per_chip", 64, "Largest clips per chip --sweep tries.")
_CHECK_SHARDING = flags.DEFINE_bool("check_sharding", True, "Read the train step's sharding "
                                    "from its HLO (replicated state, gradients reduced whole, "
                                    "activation all-gathers).")


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.aot import report
  config = _CONFIG.value.copy_and_resolve_references()
  try:
    tpu_slice = topology.parse(_TOPOLOGY.value)
  except ValueError as error:
    raise errors.ConfigError(str(error)) from error
  if _HBM_GIB.value < 0:
    raise errors.ConfigError(f"--hbm_gib={_HBM_GIB.value} must be >= 0.")
  if _HBM_GIB.value:
    tpu_slice = dataclasses.replace(tpu_slice, hbm_bytes=int(_HBM_GIB.value * 2**30))
  unknown = set(_PROGRAMS.value) - set(report.PROGRAMS)
  if unknown:
    raise errors.ConfigError(f"--programs: {sorted(unknown)} not among {report.PROGRAMS}.")
  devices = topology.devices(tpu_slice)
  logging.info("%s: %d chips (%s), %d hosts, %.0f GiB HBM per chip", tpu_slice.topology,
               len(devices), devices[0].device_kind, len({d.process_index for d in devices}),
               tpu_slice.hbm_bytes / 2**30)
  if _SWEEP.value:
    result = report.sweep(config, tpu_slice, devices, _POLICIES.value, _MAX_PER_CHIP.value)
    ok = True
  else:
    result = report.compile_all(config, tpu_slice, devices, _PROGRAMS.value, _PER_CHIP.value,
                                _SAMPLE_PER_CHIP.value, _CHECK_SHARDING.value, _write_json,
                                _HLO_DIR.value)
    ok = all(plan["fits"] for plan in result["programs"].values())
  print(report.render(result))
  _write_json(result)
  if _JSON.value:
    logging.info("report -> %s", _JSON.value)
  if not ok:
    sys.exit(1)


def _write_json(result) -> None:
  """--json, replaced whole (never half-written)."""
  if not _JSON.value:
    return
  os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
  temporary = f"{_JSON.value}.tmp"
  with open(temporary, "w") as file:
    json.dump(result, file, indent=1)
  os.replace(temporary, _JSON.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  console.run(main)
