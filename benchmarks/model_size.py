"""Per-device training memory you can plan with: the train state, the activations under each
remat policy and the largest batch that fits a device, from shapes alone (nothing materialised).

  python benchmarks/model_size.py [--config=configs/pixeldance.py] [--mesh=1x8x1]
      [--device_kind=h100 | --device_kind="NVIDIA H100 80GB HBM3"] [--device_memory_gib=60]
      [--headroom=0.1] [--policies=none,dots_saveable,nothing_saveable,full]
      [--config.unet.dtype=bfloat16] (any field of the config; give --config= with it)
  # The estimate beside XLA's memory plan of the compiled train step, on fake CPU devices:
  python benchmarks/model_size.py --config=configs/tiny.py --mesh=1x2x1 --check_xla \
      --check_batches=2,8 --check_policies=none

All figures are per device of the mesh (data x fsdp x tensor; as many fake CPU devices). The
paper config takes well under a minute for all six policies.
  - Parameter counts, and the train state under its real shardings (`state.abstract_state`,
    each leaf's shard bytes): parameters, gradients (the trainable ones, sharded like them;
    twice with grad_accum_steps > 1, the accumulator), AdamW moments, EMA, frozen weights; and
    the optimiser step's temporaries, which live after the backward pass: UPDATE_COPIES times
    the largest trainable leaf (XLA's CPU plan: 3-4 of the unit-test config's text embedding).
  - Per remat policy of `unet3d.REMAT_POLICIES`, i.e. `config.unet.remat_policy`, which the
    U-Net applies to each ResNet, temporal conv and transformer itself. The train loss
    (`step.loss_fn`) is traced once with every such layer rematerialised, and each policy is
    swapped into those layers' `checkpoint`s: the jaxpr the model traces with that policy
    (tests/test_model_size.py checks it); "none" is traced without remat. Then:
      fixed: what `jax.vjp` of the loss (w.r.t. the parameters) keeps that does not depend on
        the batch, mostly weights cast to the compute dtype (bfloat16 only); counted whole,
        unsharded (an upper bound under fsdp);
      saved/ex: what it keeps that depends on the batch or the rng (a dependency walk of the
        jaxpr from those inputs, traced at batch 1): the activations for the backward pass;
      layer/ex: a rematerialised layer's working set in its backward pass: its residuals
        without remat less those its policy keeps, the most of the three layers with the most
        residuals; 0 without remat;
      encode/ex: the peak of the frozen autoencoder's forward pass (its jaxpr's values live in
        program order), before the U-Net runs. The KL encoder holds float32 activations of all
        16 frames at 256x256: 2.0 GiB per paper clip, more than the U-Net keeps under remat;
      act/ex = max(saved + layer, encode) + the example's uint8 video and token ids.
    At b examples per device the estimate is state + max(fixed + b * act/ex, optimiser step
    temporaries); "max b/dev" is the largest b whose estimate fits the device memory less
    --headroom (default 10%: XLA's workspace, fragmentation and what is left out below). Global
    batch = b * data * fsdp; with grad_accum_steps k, b is per microbatch.
  - Device memory: DEVICE_MEMORY_GIB per device kind (matched as `throughput.PEAK_FLOPS`), or
    --device_memory_gib. JAX on GPU takes only 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION
    says otherwise: then pass what the allocator gets.
Left out: activations split over the tensor axis (counted whole: an upper bound) and the
backward pass's cotangents.

--check_xla compiles the real train step (`step.jit_train_step` on the abstract state, as
benchmarks/train_step.py --compile_only) on fake CPU devices for each --check_policies and
--check_batches (per device), and prints XLA's memory plan per device (arguments + outputs -
donated aliases + temporaries) beside the estimate: "est/XLA", and "act e/X" for both less the
state and gradients (docs/benchmarks.md has the current ratios).
The estimate runs high without remat: XLA recomputes cheap elementwise results inside fusions
rather than keep them. Remat cannot be checked on CPU: XLA's CPU pipeline drops the
optimization barriers that keep jax.checkpoint's recomputation apart right after its first CSE
pass, and the recomputation merges back into the forward pass; GPU and TPU compilers drop them
only after scheduling. The remat figures are the jaxpr's; `python -m pixeldance_jax.aot`
checks them with the TPU compiler.
"""

import functools
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from pixeldance_jax.cli import console
from pixeldance_jax.models import autoencoder as autoencoder_lib
from pixeldance_jax.models import unet3d
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.train import state as state_lib
from pixeldance_jax.train import step as step_lib

import common

# Physical memory per device, GiB, by `device_kind` substring (lower-case match, first hit wins;
# short names such as "h100" or "v5e" match too). Nominal figures: what CUDA or the TPU runtime
# reports as the total, before any allocator fraction.
DEVICE_MEMORY_GIB = (
    ("h200", 140.4), ("h100 nvl", 93.6), ("h100", 79.6), ("a100-sxm4-40gb", 40.0),
    ("a100-pcie-40gb", 40.0), ("a100 40gb", 40.0), ("a100", 80.0), ("l4", 22.5),
    ("v6", 32.0), ("v5p", 95.0), ("v5 lite", 16.0), ("v5e", 16.0),
    # A v5p reports its kind as "TPU v5" (after the v5e names, which also contain it).
    ("tpu v5", 95.0), ("v4", 32.0),
)
# XLA CPU flags for --check_xla: LLVM at -O0, which leaves XLA's buffer assignment as it is. Not
# the tests' fast-compile preset (tests/processes.py): it changes HLO passes, and so the plan.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STATE_PARTS = ("params", "grads", "adam", "ema", "frozen")
# Temporaries of the optimiser step (after the backward pass), in sizes of the largest trainable
# leaf: measured in XLA's CPU plan, up to 4 live at once (the unit-test config's text embedding).
UPDATE_COPIES = 4
# Of the layers with the most residuals without remat, how many are measured under each policy.
LARGEST_LAYERS = 3
POLICY_COLUMNS = (("policy", -32, ""), ("fixed", 7, ".2f"), ("saved/ex", 8, ".3f"),
                  ("layer/ex", 8, ".3f"), ("encode/ex", 9, ".3f"), ("act/ex", 8, ".3f"),
                  ("max b/dev", 9, ""), ("global b", 8, ""), ("GiB at max", 10, ".2f"),
                  ("at cfg", 8, ".2f"))
CHECK_COLUMNS = (("policy", -20, ""), ("mesh", 5, ""), ("b/dev", 5, ""),
                 ("compile s", 9, ".0f"), ("args", 8, ".3f"), ("temps", 8, ".3f"),
                 ("XLA", 9, ".3f"), ("estimate", 9, ".3f"), ("est/XLA", 7, ".2f"),
                 ("act XLA", 9, ".3f"), ("act est", 9, ".3f"), ("act e/X", 7, ".2f"))


# --- Devices and meshes ----------------------------------------------------------------------


def device_memory_gib(kind: str, override: float = 0.0) -> float:
  """`override` when > 0, else the table's figure for `kind`; ValueError when unknown."""
  if override > 0:
    return override
  lower = kind.lower()
  memory = next((gib for name, gib in DEVICE_MEMORY_GIB if name in lower), 0.0)
  if not memory:
    known = ", ".join(name for name, _ in DEVICE_MEMORY_GIB)
    raise ValueError(f"device kind {kind!r} is not in the table ({known}): pass "
                     "--device_memory_gib.")
  return memory


def parse_mesh(text: str) -> tuple[int, int, int]:
  """"1x8x1" -> (1, 8, 1), data x fsdp x tensor; every size given (no -1: there are no real
  devices to fill)."""
  try:
    shape = common.parse_mesh(text, 0) if "-1" not in text.split("x") else None
  except ValueError:
    shape = None
  if shape is None or min(shape) < 1:
    raise ValueError(f"--mesh={text!r}: give positive data x fsdp x tensor sizes, e.g. 1x8x1.")
  return shape


def on_mesh(config: ml_collections.ConfigDict, shape: Sequence[int], policy: str | None = None,
            per_device_batch: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` on the mesh `shape`, with remat `policy` and the global batch of
  `per_device_batch` per data-parallel device, where given."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  if policy is not None:
    config.unet.remat_policy = policy
  if per_device_batch is not None:
    config.batch_size = per_device_batch * shape[0] * shape[1]
  return config


# --- State -----------------------------------------------------------------------------------


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def state_gib(config: ml_collections.ConfigDict, shape: Sequence[int]) -> dict[str, float]:
  """GiB per device of each part of the train state and of the gradients (STATE_PARTS), and
  "update": the optimiser step's temporaries, UPDATE_COPIES of the largest trainable leaf."""
  abstract, _ = state_lib.abstract_state(on_mesh(config, shape), common.make_mesh(shape))
  trainable = {name: subtree for name, subtree in abstract.params.items()
               if name != "text_encoder" or config.text_encoder.trainable}
  grads = shard_bytes(trainable) * (2 if config.grad_accum_steps > 1 else 1)
  largest = max((shard_bytes(leaf) for leaf in jax.tree.leaves(trainable)), default=0)
  return {"params": shard_bytes(abstract.params) / common.GiB, "grads": grads / common.GiB,
          "adam": shard_bytes(abstract.opt_state) / common.GiB,
          "ema": shard_bytes(abstract.ema_params) / common.GiB,
          "frozen": shard_bytes(getattr(abstract, "frozen", {})) / common.GiB,
          "update": UPDATE_COPIES * largest / common.GiB}


def state_total(state: dict[str, float]) -> float:
  """GiB of the state and the gradients (the STATE_PARTS of `state_gib`)."""
  return sum(state[name] for name in STATE_PARTS)


def _unsharded(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_weights(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(params, frozen) as plain ShapeDtypeStructs (no shardings)."""
  abstract, _ = state_lib.abstract_state(on_mesh(config, (1, 1, 1)), common.make_mesh((1, 1, 1)))
  return _unsharded(abstract.params), _unsharded(getattr(abstract, "frozen", {}))


def param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  params, frozen = abstract_weights(config)
  counts = {name: state_lib.count_params(tree) for name, tree in params.items()}
  for name, tree in frozen.items():
    counts[f"{name} (frozen)"] = state_lib.count_params(tree)
  return counts


# --- Residuals -------------------------------------------------------------------------------


def _nbytes(aval) -> int:
  return math.prod(aval.shape) * aval.dtype.itemsize


def _tainted(jaxpr: jex_core.Jaxpr, tainted_inputs: Sequence[bool]) -> set:
  """The variables of `jaxpr` computed from the inputs flagged in `tainted_inputs`."""
  tainted = {var for var, flag in zip(jaxpr.invars, tainted_inputs, strict=True) if flag}
  for eqn in jaxpr.eqns:
    if any(isinstance(var, jex_core.Var) and var in tainted for var in eqn.invars):
      tainted.update(eqn.outvars)
  return tainted


# Primitives that XLA lowers to bitcasts (no memory of their own) for its default layouts.
VIEWS = ("reshape", "squeeze", "expand_dims")


def _views(jaxpr: jex_core.Jaxpr) -> set:
  """The inputs of `jaxpr` and what only reshapes them (a residual that is one of these holds
  no memory besides the input's)."""
  views = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    source = eqn.invars[0] if eqn.invars else None
    if eqn.primitive.name in VIEWS and isinstance(source, jex_core.Var) and source in views:
      views.update(eqn.outvars)
  return views


def _input_flags(args: Sequence[Any], varying: Sequence[int]) -> list[bool]:
  """Per flattened leaf of `args`: whether it belongs to an argument in `varying`."""
  return [i in varying for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]


def residual_bytes(fn: Callable[..., Any], args: Sequence[Any], wrt: Sequence[int],
                   varying: Sequence[int], policy: Any = None, forwarded: bool = False
                   ) -> tuple[int, int]:
  """(batch-dependent, other) bytes of the residuals `jax.vjp` keeps for `fn(*args)` w.r.t.
  `args[i]` for i in `wrt`; "batch-dependent": computed from `args[i]` for i in `varying`.

  `policy`: a jax.checkpoint policy, or "full" (save nothing) to wrap `fn` in `jax.checkpoint`
  first; None: as is. Residuals that are inputs passed through are counted only when
  `forwarded` (the caller's state and batch are counted elsewhere). Traced only.
  """
  if policy is not None:
    fn = jax.checkpoint(fn, policy=None if policy == "full" else policy)

  def residuals(*args):
    def of_wrt(*diff):
      full = list(args)
      for i, value in zip(wrt, diff):
        full[i] = value
      return fn(*full)
    return jax.vjp(of_wrt, *(args[i] for i in wrt))[1]

  closed = jax.make_jaxpr(residuals)(*args)
  jaxpr = closed.jaxpr
  tainted = _tainted(jaxpr, _input_flags(args, varying))
  inputs = _views(jaxpr)
  seen, varying_bytes, other_bytes = set(), 0, 0
  for var in jaxpr.outvars:
    if not isinstance(var, jex_core.Var) or var in seen or (var in inputs and not forwarded):
      continue
    seen.add(var)
    if var in tainted:
      varying_bytes += _nbytes(var.aval)
    else:
      other_bytes += _nbytes(var.aval)
  return varying_bytes, other_bytes


def _loss_args(config: ml_collections.ConfigDict, batch: int) -> tuple[Any, ...]:
  """(params, frozen, batch, rng) of `step.loss_fn`, as ShapeDtypeStructs."""
  params, frozen = abstract_weights(config)
  return params, frozen, common.batch_shapes(config, batch), jax.random.key(0)


def _loss(config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """`step.loss_fn` on (params, frozen, batch, rng), as the train step calls it."""
  return lambda params, frozen, batch, rng: step_lib.loss_fn(params, frozen, batch, rng,
                                                             config)[0]


# Arguments of the loss: params (differentiated), frozen, batch and rng (what varies per example).
WRT, VARYING = (0,), (2, 3)


def loss_residuals(config: ml_collections.ConfigDict, policy: str) -> tuple[int, int]:
  """(bytes per example, batch-independent bytes) that `jax.vjp` of the train loss keeps with
  the U-Net's `config.unet.remat_policy` set to `policy`, traced at batch 1."""
  config = config.copy_and_resolve_references()
  config.unet.remat_policy = policy
  return residual_bytes(_loss(config), _loss_args(config, 1), WRT, VARYING)


def _is_remat(eqn: jex_core.JaxprEqn) -> bool:
  return eqn.primitive.name in ("checkpoint", "remat2", "remat")


def with_policy(jaxpr: jex_core.Jaxpr, policy: Any) -> jex_core.Jaxpr:
  """`jaxpr` with every rematerialised call's policy (and those nested in it) set to `policy`
  (a jax.checkpoint policy; None saves nothing): what `nn.remat(..., policy=policy)` traces."""
  eqns = []
  for eqn in jaxpr.eqns:
    params = dict(eqn.params)
    if _is_remat(eqn):
      params["policy"] = policy
    for name, value in params.items():
      if isinstance(value, jex_core.ClosedJaxpr):
        params[name] = jex_core.ClosedJaxpr(with_policy(value.jaxpr, policy), value.consts)
      elif isinstance(value, jex_core.Jaxpr):
        params[name] = with_policy(value, policy)
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def _jax_policy(policy: str) -> Any:
  """The jax.checkpoint policy of a `config.unet.remat_policy` other than "none"."""
  return None if policy == "full" else getattr(jax.checkpoint_policies, policy)


class LossTrace:
  """The train loss traced once with every U-Net layer rematerialised ("full"): its jaxpr gives
  the residuals under any policy (the policy swapped in each layer's `checkpoint`, as the
  model's own `remat_policy` would set it) and the layers themselves."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config.copy_and_resolve_references()
    self.config.unet.remat_policy = "full"
    self.args = _loss_args(self.config, 1)
    self._residuals = {}

  @functools.cached_property
  def closed(self) -> jex_core.ClosedJaxpr:
    return jax.make_jaxpr(_loss(self.config))(*self.args)

  def residuals(self, policy: str) -> tuple[int, int]:
    """(bytes per example, batch-independent bytes) of the residuals under `policy`; "none" is
    traced again without remat."""
    if policy not in self._residuals:
      if policy == "none":
        self._residuals[policy] = loss_residuals(self.config, policy)
      else:
        fn = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(
            with_policy(self.closed.jaxpr, _jax_policy(policy)), self.closed.consts))
        self._residuals[policy] = residual_bytes(
            lambda *args: fn(*jax.tree.leaves(args))[0], self.args, WRT, VARYING)
    return self._residuals[policy]

  def layers(self) -> list[tuple[jex_core.Jaxpr, list[bool]]]:
    return remat_layers(self.closed.jaxpr, _input_flags(self.args, VARYING))


def _sub_jaxprs(eqn: jex_core.JaxprEqn):
  """The sub-jaxprs of `eqn` whose inputs are the eqn's own, one to one (calls, jit)."""
  for value in eqn.params.values():
    jaxpr = value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
    if isinstance(jaxpr, jex_core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
      yield jaxpr


def remat_layers(jaxpr: jex_core.Jaxpr, tainted_inputs: Sequence[bool],
                 found: list | None = None) -> list[tuple[jex_core.Jaxpr, list[bool]]]:
  """Every rematerialised call (`jax.checkpoint`, which `nn.remat` is) in `jaxpr`, with which
  of its inputs depend on the batch, in program order."""
  found = [] if found is None else found
  tainted = _tainted(jaxpr, tainted_inputs)
  for eqn in jaxpr.eqns:
    flags_in = [isinstance(var, jex_core.Var) and var in tainted for var in eqn.invars]
    if _is_remat(eqn):
      found.append((eqn.params["jaxpr"], flags_in))
      continue
    for sub in _sub_jaxprs(eqn):
      remat_layers(sub, flags_in, found)
  return found


def _shape_struct(aval) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


def layer_residual_bytes(layer: jex_core.Jaxpr, tainted_inputs: Sequence[bool],
                         policy: Any = None) -> int:
  """Batch-dependent bytes that `jax.vjp` keeps for one layer (w.r.t. its floating inputs,
  activations and weights), without remat (None) or under the jax.checkpoint `policy` ("full":
  save nothing); its inputs included."""
  fn = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(layer, ()))
  args = [_shape_struct(var.aval) for var in layer.invars]
  wrt = [i for i, arg in enumerate(args) if jnp.issubdtype(arg.dtype, jnp.inexact)]
  varying = [i for i, flag in enumerate(tainted_inputs) if flag]
  return residual_bytes(lambda *a: fn(*a), args, wrt, varying, policy, forwarded=True)[0]


def layer_working_bytes(trace: LossTrace, policies: Sequence[str]) -> dict[str, int]:
  """Per policy, bytes per example that the backward pass of one rematerialised layer adds to
  what the policy saved: max over the LARGEST_LAYERS layers with the most residuals without
  remat of (residuals without remat - residuals under the policy). 0 for "none"."""
  working = {policy: 0 for policy in policies if policy in ("none", "everything_saveable")}
  if len(working) == len(policies):
    return working
  unique = {}
  for layer, tainted in trace.layers():  # Layers of one shape and program are measured once.
    key = (tuple(str(var.aval) for var in layer.invars), tuple(tainted),
           tuple(eqn.primitive.name for eqn in layer.eqns))
    unique.setdefault(key, (layer, tainted))
  plain = sorted(((layer_residual_bytes(layer, tainted), layer, tainted)
                  for layer, tainted in unique.values()), key=lambda item: -item[0])
  largest = plain[:LARGEST_LAYERS]
  for policy in policies:
    if policy in working or not largest:
      working[policy] = 0
      continue
    working[policy] = max(
        max(0, none - layer_residual_bytes(layer, tainted, "full" if policy == "full" else
                                           _jax_policy(policy)))
        for none, layer, tainted in largest)
  return working


def batch_bytes_per_example(config: ml_collections.ConfigDict) -> int:
  return sum(_nbytes(x) for x in common.batch_shapes(config, 1).values())


def peak_bytes(jaxpr: jex_core.Jaxpr) -> int:
  """Peak bytes of the values `jaxpr` creates (its inputs not counted) when its equations run
  in program order and each value is freed after its last use; a call's own peak counts at its
  place. Elementwise chains free as they go, so this is near what XLA's fusions hold."""
  last_use = {}
  for index, eqn in enumerate(jaxpr.eqns):
    for var in eqn.invars:
      if isinstance(var, jex_core.Var):
        last_use[var] = index
  for var in jaxpr.outvars:
    if isinstance(var, jex_core.Var):
      last_use[var] = len(jaxpr.eqns)
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  live = peak = 0
  for index, eqn in enumerate(jaxpr.eqns):
    inner = max((peak_bytes(sub) for sub in _sub_jaxprs(eqn)), default=0)
    outputs = [var for var in eqn.outvars if not isinstance(var, jex_core.DropVar)]
    created = sum(_nbytes(var.aval) for var in outputs)
    peak = max(peak, live + max(created, inner))
    live += created
    freed = {var for var in eqn.invars if isinstance(var, jex_core.Var) and var not in inputs
             and last_use.get(var) == index}
    freed |= {var for var in outputs if var not in last_use}
    live -= sum(_nbytes(var.aval) for var in freed)
  return peak


def encode_peak_bytes(config: ml_collections.ConfigDict) -> int:
  """Peak bytes per example of encoding a clip with the frozen autoencoder (forward only, before
  the U-Net runs: the KL encoder holds full-resolution float32 activations of every frame)."""
  params, frozen = abstract_weights(config)
  del params
  video = common.batch_shapes(config, 1)["video"]

  def encode(frozen, video, rng):
    autoencoder = autoencoder_lib.make_autoencoder(config, frozen.get("autoencoder"))
    return autoencoder.encode(autoencoder_lib.to_pixels(video), rng)

  return peak_bytes(jax.make_jaxpr(encode)(frozen, video, jax.random.key(0)).jaxpr)


def activation_estimates(config: ml_collections.ConfigDict, policies: Sequence[str],
                         trace: LossTrace | None = None) -> dict[str, dict[str, float]]:
  """Per policy, GiB: "fixed" (batch-independent residuals), per example "saved" (residuals),
  "layer" (one layer's working set in its backward), "encode" (the autoencoder's forward peak),
  "batch" (inputs) and "per_example" = max(saved + layer, encode) + batch. `trace`: the
  config's LossTrace, if there is one already."""
  trace = trace or LossTrace(config)
  working = layer_working_bytes(trace, policies)
  batch, encode = batch_bytes_per_example(config), encode_peak_bytes(config)
  estimates = {}
  for policy in policies:
    saved, fixed = trace.residuals(policy)
    per_example = max(saved + working[policy], encode) + batch
    estimates[policy] = {"fixed": fixed / common.GiB, "saved": saved / common.GiB,
                         "layer": working[policy] / common.GiB, "encode": encode / common.GiB,
                         "batch": batch / common.GiB, "per_example": per_example / common.GiB}
  return estimates


def estimate_gib(state: dict[str, float], activations: dict[str, float], batch: int) -> float:
  """Estimated GiB per device at `batch` examples per device: the state and gradients, and the
  larger of the activations (forward and backward) and the optimiser step's temporaries."""
  return state_total(state) + max(activations["fixed"] + batch * activations["per_example"],
                                  state["update"])


def largest_batch(state: dict[str, float], activations: dict[str, float], memory_gib: float,
                  headroom: float) -> int:
  """The largest per-device batch whose estimate fits `memory_gib * (1 - headroom)`; 0: none."""
  usable = memory_gib * (1.0 - headroom)
  if estimate_gib(state, activations, 1) > usable:
    return 0
  return math.floor((usable - state_total(state) - activations["fixed"])
                    / activations["per_example"])


# --- XLA's memory plan -----------------------------------------------------------------------


def compile_step(config: ml_collections.ConfigDict, mesh) -> tuple[Any, float]:
  """(compiled train step, seconds to lower and compile) from the abstract state, as
  benchmarks/train_step.py's compile_step (nothing materialised)."""
  start = time.perf_counter()
  abstract, shardings = state_lib.abstract_state(config, mesh)
  batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.batch_sharding(mesh))
           for name, x in common.batch_shapes(config, config.batch_size).items()}
  step = step_lib.jit_train_step(config, mesh, shardings)
  step.compile(step.lower(abstract, batch, jax.random.key(0)))
  return step, time.perf_counter() - start


def xla_plan_gib(step) -> dict[str, float]:
  """XLA's memory plan per device, GiB, of the step's largest program (they run one after the
  other): arguments, outputs, aliases (donated), temporaries and
  "total" = arguments + outputs - aliases + temporaries."""
  best = {}
  for compiled in step.executables.values():
    plan = compiled.memory_analysis()
    parts = {"args": plan.argument_size_in_bytes, "outputs": plan.output_size_in_bytes,
             "aliases": plan.alias_size_in_bytes, "temps": plan.temp_size_in_bytes}
    parts = {name: value / common.GiB for name, value in parts.items()}
    parts["total"] = parts["args"] + parts["outputs"] - parts["aliases"] + parts["temps"]
    if parts["total"] > best.get("total", -1.0):
      best = parts
  return best


def check_xla(config: ml_collections.ConfigDict, shape: Sequence[int], policies: Sequence[str],
              batches: Sequence[int], estimates: dict[str, dict[str, float]],
              state: dict[str, float], emit: Callable[[str], None] = print, scale: float = 1.0
              ) -> list[dict]:
  """Compiles the train step per policy and per-device batch on the mesh `shape`; one row each
  (GiB; printed through `emit`, times `scale`): XLA's plan beside the estimate. "act": the plan
  less the state."""
  rows = []
  emit(common.header_line(CHECK_COLUMNS))
  for policy in policies:
    for batch in batches:
      run_config = on_mesh(config, shape, policy, batch)
      compiled, seconds = compile_step(run_config, common.make_mesh(shape))
      plan = xla_plan_gib(compiled)
      estimate = estimate_gib(state, estimates[policy], batch)
      base = state_total(state)
      row = {"policy": policy, "mesh": "x".join(map(str, shape)), "batch": batch,
             "seconds": seconds, "args": plan["args"], "temps": plan["temps"],
             "xla": plan["total"], "estimate": estimate, "ratio": estimate / plan["total"],
             "act_xla": plan["total"] - base, "act_estimate": estimate - base}
      row["act_ratio"] = row["act_estimate"] / row["act_xla"] if row["act_xla"] > 0 else math.nan
      rows.append(row)
      gib = ("args", "temps", "xla", "estimate", "act_xla", "act_estimate")
      emit(common.row_line(CHECK_COLUMNS, [scale * value if name in gib else value
                                           for name, value in row.items()]))
  return rows


# --- Command line ----------------------------------------------------------------------------


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program: tests import this module)."""
  policies = list(unet3d.REMAT_POLICIES)
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Config file; default configs/pixeldance.py (then --config.* "
          "overrides need --config=configs/pixeldance.py too)."),
      "mesh": flags.DEFINE_string("mesh", "1x8x1", "data x fsdp x tensor sizes (fake CPU "
                                  "devices: shapes only)."),
      "device_kind": flags.DEFINE_string("device_kind", "h100", "A device_kind such as \"NVIDIA "
                                         "H100 80GB HBM3\", or h100, h200, a100, v5p, v5e..."),
      "device_memory_gib": flags.DEFINE_float("device_memory_gib", 0.0, "GiB per device; "
                                              "overrides the table's figure for --device_kind."),
      "headroom": flags.DEFINE_float("headroom", 0.1, "Fraction of device memory left free "
                                     "(XLA workspace, fragmentation, what is not estimated)."),
      "policies": flags.DEFINE_list("policies", policies, f"Remat policies, of {policies}."),
      "check_xla": flags.DEFINE_bool("check_xla", False, "Compile the train step on CPU and "
                                     "print XLA's memory plan beside the estimate."),
      "check_batches": flags.DEFINE_list("check_batches", ["1", "2"], "Per-device batches that "
                                         "--check_xla compiles."),
      "check_policies": flags.DEFINE_list("check_policies", [], "Policies that --check_xla "
                                          "compiles; default: --policies."),
  }


_FLAGS: dict[str, Any] = {}


def _flag(name: str) -> Any:
  return _FLAGS[name].value


def main(argv) -> None:
  del argv
  start = time.perf_counter()
  try:
    shape = parse_mesh(_flag("mesh"))
    memory = device_memory_gib(_flag("device_kind"), _flag("device_memory_gib"))
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  policies = _flag("policies")
  unknown = sorted(set(policies + _flag("check_policies")) - set(unet3d.REMAT_POLICIES))
  if unknown:
    raise app.UsageError(f"Unknown remat policies {unknown}: of {unet3d.REMAT_POLICIES}.")
  if _flag("check_xla"):  # LLVM at -O0: the plan is made before, unchanged.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()
  common.start_jax(cpu_devices=math.prod(shape), platform="cpu")  # Shapes only.
  # Tracing builds large graphs of objects: collections of everything imported (frozen here)
  # and frequent ones otherwise take half the time (as tests/conftest.py says of the suite).
  gc.collect()
  gc.freeze()
  gc.set_threshold(50_000, 20, 100)
  config = _flag("config") or common.paper.get_config()
  data_parallel, headroom = shape[0] * shape[1], _flag("headroom")

  counts = param_counts(config)
  for name, count in counts.items():
    print(f"{name:>24}: {count / 1e6:8.1f} M parameters")
  trainable = counts["unet"] + (counts["text_encoder"] if config.text_encoder.trainable else 0)
  print(f"{'trainable':>24}: {trainable / 1e6:8.1f} M")

  state = state_gib(config, shape)
  estimates = activation_estimates(config, policies)
  size = config.data.image_size // config.autoencoder.patch_size
  cfg_batch = config.batch_size / data_parallel
  # MiB where GiB would print zeros (the small configs).
  largest = max([state_total(state)] + [act["per_example"] for act in estimates.values()])
  unit, scale = ("GiB", 1) if largest >= 1 else ("MiB", 1024)
  print(f"\nMesh {'x'.join(map(str, shape))} (data x fsdp x tensor); {_flag('device_kind')}: "
        f"{memory:.1f} GiB per device, {100 * headroom:.0f}% headroom -> "
        f"{memory * (1 - headroom):.1f} GiB to plan with.")
  print(f"Train state per device, {unit}: "
        + ", ".join(f"{name} {scale * state[name]:.3f}" for name in STATE_PARTS)
        + f"; total {scale * state_total(state):.3f}; optimiser step temporaries "
        f"{scale * state['update']:.3f}")
  print(f"\nActivations, U-Net {config.unet.dtype}, {config.data.frames}x{size}x{size} latents, "
        f"{unit}: per device (fixed) and per example (/ex); max b/dev: the largest per-device "
        f"batch that fits, GiB at max: the estimate there; at cfg: the estimate at the config's "
        f"batch {config.batch_size} ({cfg_batch:g} per device):")
  print(common.header_line(POLICY_COLUMNS))
  for policy in policies:
    act = estimates[policy]
    batch = largest_batch(state, act, memory, headroom)
    print(common.row_line(POLICY_COLUMNS, (
        policy, scale * act["fixed"], scale * act["saved"], scale * act["layer"],
        scale * act["encode"], scale * act["per_example"], batch, batch * data_parallel,
        estimate_gib(state, act, batch), scale * estimate_gib(state, act, cfg_batch))))
  print(f"(estimate: {time.perf_counter() - start:.0f} s)")

  if _flag("check_xla"):
    check_policies = _flag("check_policies") or policies
    batches = [int(b) for b in _flag("check_batches")]
    extra = [p for p in check_policies if p not in estimates]
    estimates.update(activation_estimates(config, extra) if extra else {})
    print(f"\nXLA's memory plan of the compiled train step ({common.machine_summary()}), "
          f"{unit} per device; args: arguments (state and batch); act: less the state:")
    check_xla(config, shape, check_policies, batches, estimates, state,
              emit=lambda line: print(line, flush=True), scale=scale)
  print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  console.run(main)
