"""TPU slices by the names users rent them under, as devices JAX can compile for on any host.

`jax.experimental.topologies.get_topology_desc` builds the devices of a slice from libtpu's
description of it, with no TPU attached: a mesh over them lowers and compiles exactly as on the
slice itself (multi-host slices included, since nothing runs). Names follow Cloud TPU's: v4 and
v5p count TensorCores (two per chip, one JAX device per chip), v5e and v6e count chips.
"""

import dataclasses
import importlib.util
import re

import jax
from jax.experimental import topologies

from pixeldance_jax.runtime import host_memory

# HBM per chip, GiB (Cloud TPU's system architecture pages).
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# libtpu's topology names use these generation tags.
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# Chips -> physical shape: 3-D tori for v4 and v5p, 2-D for v5e and v6e.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `name` as given, libtpu's `topology` ("v5p:2x4x4"), chips and HBM per chip."""
  name: str
  generation: str
  topology: str
  chips: int
  hbm_bytes: int


def parse(name: str) -> Slice:
  """"v5p-64" (Cloud TPU's accelerator type) or "v5p:2x4x4" (libtpu's topology) -> `Slice`."""
  text = name.strip().lower().replace("v5litepod", "v5e")
  generation, shape = _split(text, name)
  if generation not in HBM_GIB:
    raise ValueError(f"--topology={name!r}: unknown TPU generation {generation!r}; one of "
                     f"{sorted(HBM_GIB)}.")
  three_d = generation in ("v4", "v5p")
  if re.fullmatch(r"\d+(x\d+)+", shape):
    sizes = [int(size) for size in shape.split("x")]
    if len(sizes) != (3 if three_d else 2):
      raise ValueError(f"--topology={name!r}: {generation} slices are {3 if three_d else 2}-D "
                       "(e.g. v5p:2x2x2, v5e:2x4).")
    chips = 1
    for size in sizes:
      chips *= size
  elif shape.isdigit():
    count = int(shape)
    chips, remainder = divmod(count, _CORES_PER_CHIP[generation])
    shapes = _SHAPES_3D if three_d else _SHAPES_2D
    if remainder or chips not in shapes:
      sizes = sorted(n * _CORES_PER_CHIP[generation] for n in shapes)
      raise ValueError(f"--topology={name!r}: no {generation} slice of {count}; known sizes: "
                       f"{', '.join(map(str, sizes))} (or give the shape, e.g. "
                       f"{generation}:{shapes[8]}).")
    shape = shapes[chips]
  else:
    raise ValueError(f"--topology={name!r}: expected e.g. v5p-64 or v5p:2x4x4.")
  return Slice(name=name, generation=generation, topology=f"{_LIBTPU_NAMES[generation]}:{shape}",
               chips=chips, hbm_bytes=int(HBM_GIB[generation] * 2**30))


def _split(text: str, name: str) -> tuple[str, str]:
  for separator in (":", "-"):
    if separator in text:
      generation, shape = text.split(separator, 1)
      return generation, shape
  raise ValueError(f"--topology={name!r}: expected e.g. v5p-64 or v5p:2x4x4.")


def devices(tpu_slice: Slice) -> list[jax.Device]:
  """The slice's devices (one per chip), for a mesh to compile on; needs libtpu installed
  (`pip install -e ".[tpu]"`)."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("compiling for TPU needs libtpu: pip install -e \".[tpu]\"")
  host_memory.quiet_libtpu()
  # v4's two TensorCores per chip are one device ("megacore"), as JAX runs them.
  options = {"chip_config_name": "megacore"} if tpu_slice.generation == "v4" else {}
  description = topologies.get_topology_desc(topology_name=tpu_slice.topology, platform="tpu",
                                             **options)
  found = list(description.devices)
  if len(found) != tpu_slice.chips:
    raise RuntimeError(f"{tpu_slice.topology}: libtpu describes {len(found)} devices, expected "
                       f"{tpu_slice.chips} chips.")
  return found
