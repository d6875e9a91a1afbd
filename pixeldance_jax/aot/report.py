"""The ahead-of-time report: which programs, on which mesh, and what the compiler planned."""

import gc
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from pixeldance_jax.runtime import errors, host_memory
from pixeldance_jax.aot import plan as plan_lib
from pixeldance_jax.aot import topology
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib

PROGRAMS = ("train_step", "image_step", "update", "sample")
GiB = 2**30


def _mesh(config: ml_collections.ConfigDict, devices: list) -> jax.sharding.Mesh:
  try:
    return mesh_lib.make_mesh(config.mesh, devices)
  except ValueError as error:
    raise errors.ConfigError(str(error)) from error


def _check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  shards = mesh_lib.batch_devices(mesh)
  if config.batch_size % shards:
    raise errors.ConfigError(f"config.batch_size={config.batch_size} does not split over the "
                              f"{shards} data x fsdp devices of the mesh {dict(mesh.shape)}.")


def _header(config: ml_collections.ConfigDict, tpu_slice: topology.Slice, devices: list,
            mesh: jax.sharding.Mesh) -> dict[str, Any]:
  params = state_lib.abstract_state(config, mesh)[0].params
  return {"topology": tpu_slice.name, "libtpu_topology": tpu_slice.topology,
          "parameters": {name: state_lib.count_params(tree) for name, tree in params.items()},
          "chips": len(devices), "hosts": len({d.process_index for d in devices}),
          "device_kind": devices[0].device_kind, "hbm_bytes": tpu_slice.hbm_bytes,
          "mesh": dict(mesh.shape), "batch_size": config.batch_size,
          "per_chip": config.batch_size / mesh_lib.batch_devices(mesh),
          "unet_dtype": str(config.unet.dtype), "remat_policy": config.unet.remat_policy,
          "attention_impl": config.unet.attention_impl,
          "kernels": config.unet.kernels, "jax": jax.__version__}


def _release_memory() -> None:
  """Drops the compiled program and returns the compiler's freed memory to the system, so a
  slice's programs compile one after another within the largest one's peak."""
  jax.clear_caches()
  gc.collect()
  host_memory.release_free_memory()


def compile_all(config: ml_collections.ConfigDict, tpu_slice: topology.Slice, devices: list,
                programs: list[str], per_chip: int = 0, sample_per_chip: int = 1,
                check_sharding: bool = True,
                on_program: Callable[[dict[str, Any]], None] = lambda result: None,
                hlo_dir: str = "") -> dict[str, Any]:
  """Compiles `programs` for the slice; the report as a JSON-able dict, also handed to
  `on_program` after each program (what is done survives a later one running out of memory).
  `hlo_dir`: also write each program's optimized HLO there, as `<program>.hlo.txt`."""
  mesh = _mesh(config, devices)
  shards = mesh_lib.batch_devices(mesh)
  if per_chip:
    config.batch_size = per_chip * shards
  _check_batch(config, mesh)
  result = _header(config, tpu_slice, devices, mesh)
  result["programs"], result["skipped"] = {}, {}
  for name in programs:
    if name == "image_step" and not config.data.image_every_k_steps:
      result["skipped"][name] = "config.data.image_every_k_steps is 0 (no joint image training)"
      continue
    if name == "update" and not config.separate_update:
      result["skipped"][name] = "config.separate_update is False (the steps hold the update)"
      continue
    logging.info(f"compiling {name} for {tpu_slice.topology} ...")
    if name == "sample":
      plan, compiled = plan_lib.compile_sampler(config, mesh, tpu_slice.hbm_bytes,
                                                sample_per_chip * shards)
    else:
      plan, compiled = plan_lib.compile_train_step(config, mesh, tpu_slice.hbm_bytes,
                                                   image_step=name == "image_step",
                                                   update=name == "update")
    logging.info(f"{name}: compiled in {plan.compile_seconds:.1f} s, "
                     f"{plan.total_bytes / GiB:.2f} GiB per chip")
    result["programs"][name] = plan.as_dict()
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as file:
        file.write(compiled.as_text())
    if name == "train_step" and check_sharding:
      result["sharding"] = plan_lib.sharding_findings(config, mesh, compiled.as_text())
    del compiled
    _release_memory()
    on_program(result)
  return result


def _fits(config: ml_collections.ConfigDict, tpu_slice: topology.Slice,
          mesh: jax.sharding.Mesh, per_chip: int) -> plan_lib.Plan:
  config.batch_size = per_chip * mesh_lib.batch_devices(mesh)
  plan, _ = plan_lib.compile_train_step(config, mesh, tpu_slice.hbm_bytes)
  logging.info(f"  {config.unet.remat_policy}, {per_chip} per chip: "
                   f"{plan.total_bytes / GiB:.2f} GiB ({'fits' if plan.fits else 'too large'}, "
                   f"{plan.compile_seconds:.0f} s)")
  _release_memory()
  return plan


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
  """The largest n in [1, limit] with `fits(n)`, assuming fitting is monotone (0 if 1 does not
  fit): doubling from 1 until one does not fit, then bisecting; about 2 log2(n) calls."""
  best, worst = 0, limit + 1
  n = 1
  while n < worst and fits(n):
    best, n = n, min(2 * n, limit) if n < limit else worst
  worst = min(worst, n)
  while worst - best > 1:
    middle = (best + worst) // 2
    best, worst = (middle, worst) if fits(middle) else (best, middle)
  return best


def sweep(config: ml_collections.ConfigDict, tpu_slice: topology.Slice, devices: list,
          policies: list[str], max_per_chip: int) -> dict[str, Any]:
  """For each remat policy, the largest clips per chip (up to `max_per_chip`) whose train step
  fits (`largest_fitting`)."""
  mesh = _mesh(config, devices)
  result = _header(config, tpu_slice, devices, mesh)
  result["programs"], result["sweep"] = {}, []
  for policy in policies:
    config.unet.remat_policy = policy
    tried = {}

    def fits(per_chip: int, tried=tried) -> bool:
      tried[per_chip] = _fits(config, tpu_slice, mesh, per_chip)
      return tried[per_chip].fits

    best = largest_fitting(fits, max_per_chip)
    row = {"remat_policy": policy, "max_per_chip": best,
           "tried": {str(k): {"total_bytes": v.total_bytes, "fits": v.fits,
                              "compile_seconds": v.compile_seconds} for k, v in tried.items()}}
    if best:
      row["plan"] = tried[best].as_dict()
    result["sweep"].append(row)
  result["remat_policy"] = ",".join(policies)
  return result


def _gib(value: float) -> str:
  return f"{value / GiB:.2f}"


def render(result: dict[str, Any]) -> str:
  """The report as a few lines of text."""
  sizes = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in result["parameters"].items())
  lines = [f"{result['topology']} ({result['libtpu_topology']}): {result['chips']} x "
           f"{result['device_kind']}, {result['hosts']} host(s), "
           f"{result['hbm_bytes'] / GiB:.0f} GiB HBM per chip; mesh {result['mesh']}; "
           f"U-Net {result['unet_dtype']}, remat {result['remat_policy']}, attention "
           f"{result['attention_impl']}; parameters: {sizes}"]
  programs = result.get("programs", {})
  if programs:
    lines.append(f"{'program':<11} {'batch':>6} {'args':>7} {'out':>7} {'alias':>7} "
                 f"{'temp':>7} {'total':>7} {'HBM':>6}  {'fits':<5} {'TFLOP':>8} "
                 f"{'GB moved':>9} {'compile s':>9}")
  for name, plan in programs.items():
    lines.append(
        f"{name:<11} {plan['batch']:>6} {_gib(plan['argument_bytes']):>7} "
        f"{_gib(plan['output_bytes']):>7} {_gib(plan['alias_bytes']):>7} "
        f"{_gib(plan['temp_bytes']):>7} {_gib(plan['total_bytes']):>7} "
        f"{plan['capacity_bytes'] / GiB:>6.0f}  {'yes' if plan['fits'] else 'NO':<5} "
        f"{plan['flops'] / 1e12:>8.3f} {plan['bytes_accessed'] / 1e9:>9.2f} "
        f"{plan['compile_seconds']:>9.1f}")
  if programs:
    lines.append("(GiB per chip: arguments, outputs, donated arguments reused by outputs, "
                 "temporaries, total = args + out - alias + temp + code; TFLOP and GB moved per "
                 "chip per call)")
  for name, plan in programs.items():
    kinds = ", ".join(f"{kind} {c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
                      for kind, c in plan["collectives"].items() if c["count"])
    lines.append(f"collectives in {name}: {kinds or 'none'}")
    if plan.get("custom_calls"):
      calls = ", ".join(f"{target} {count}" for target, count in plan["custom_calls"].items())
      lines.append(f"custom calls in {name}: {calls}")
  for name, why in result.get("skipped", {}).items():
    lines.append(f"{name}: not compiled, {why}")
  findings = result.get("sharding")
  if findings:
    lines.append(
        f"sharding of train_step: {len(findings['replicated'])} state arrays replicated against "
        f"the rules, {findings['reduce_scatters']} reduce-scatters, "
        f"{len(findings['all_reduced_gradients'])} gradients all-reduced whole "
        f"({findings['all_reduced_gradient_bytes'] / 2**20:.1f} MiB), "
        f"{len(findings['activation_gathers'])} all-gathers larger than the largest weight "
        f"({findings['largest_weight_bytes'] / 2**20:.1f} MiB)")
    lines.append(f"  a reduce-scatter over fsdp on this slice compiles to: "
                 f"{findings['reduce_scatter_lowering']}")
    for key in ("replicated", "all_reduced_gradients", "activation_gathers"):
      for item in findings[key][:5]:
        lines.append(f"  {key}: {item}")
  for row in result.get("sweep", []):
    plan = row.get("plan")
    lines.append(f"remat {row['remat_policy']:<16} largest batch per chip that fits: "
                 f"{row['max_per_chip']}" + (
                     f" ({_gib(plan['total_bytes'])} GiB, {plan['flops'] / 1e12:.2f} TFLOP "
                     "per step per chip)" if plan else ""))
  return "\n".join(lines)
