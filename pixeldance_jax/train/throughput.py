"""Throughput figures for the logs: clips/s, TFLOP/s and model FLOPs utilisation (MFU)."""

import jax

# Dense peak FLOP/s per device by `device_kind` substring (bf16 on accelerators; lower-case
# match, first hit wins). CPUs have no entry: their MFU is not reported.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12),
    ("l4", 121e12), ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
    # A v5p reports its kind as "TPU v5" (after the v5e names, which also contain it).
    ("tpu v5", 459e12), ("v4", 275e12),
)


def peak_flops_per_device(device: jax.Device, override: float = 0.0) -> float:
  """`override` when > 0, else the table's figure for the device kind, else 0 (unknown)."""
  if override > 0:
    return override
  kind = device.device_kind.lower()
  return next((peak for name, peak in PEAK_FLOPS if name in kind), 0.0)


def throughput(steps_per_sec: float, clips_per_step: int, flops_per_device: float,
               peak: float) -> dict[str, float]:
  """clips/s for the whole job; TFLOP/s per device and MFU (when the peak is known)."""
  figures = {"clips_per_sec": steps_per_sec * clips_per_step}
  if flops_per_device:
    figures["tflops_per_sec_per_device"] = steps_per_sec * flops_per_device / 1e12
    if peak:
      figures["mfu"] = steps_per_sec * flops_per_device / peak
  return figures
