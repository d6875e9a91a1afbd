"""python -m pixeldance_jax.aot: TPU slices by name, collectives read from HLO text, and the
unit-test programs compiled for a TPU slice by libtpu's compiler on this CPU host."""

import importlib.util
import json

import pytest

import helpers
import processes
from pixeldance_jax.aot import hlo, plan, report, topology

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name, libtpu_name, chips, hbm_gib", [
    ("v5p-8", "v5p:2x2x1", 4, 95), ("v5p-64", "v5p:2x4x4", 32, 95),
    ("v5p-256", "v5p:4x4x8", 128, 95), ("v4-8", "v4:2x2x1", 4, 32),
    ("v5e-8", "v5e:2x4", 8, 16), ("v5litepod-16", "v5e:4x4", 16, 16),
    ("v6e-64", "v6e:8x8", 64, 32), ("v5p:2x2x2", "v5p:2x2x2", 8, 95)])
def test_slices_by_cloud_and_libtpu_names(name, libtpu_name, chips, hbm_gib):
  tpu_slice = topology.parse(name)
  assert (tpu_slice.topology, tpu_slice.chips) == (libtpu_name, chips)
  assert tpu_slice.hbm_bytes == hbm_gib * 2**30


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "no v5p slice of 6"), ("v7-8", "unknown TPU generation"),
    ("v5p:2x2", "3-D"), ("tpu", "expected e.g.")])
def test_bad_slice_names_are_explained(name, message):
  with pytest.raises(ValueError, match=message):
    topology.parse(name)


@pytest.mark.parametrize("largest, limit", [(0, 64), (1, 64), (5, 64), (37, 64), (64, 64),
                                            (100, 64), (12, 12)])
def test_sweep_finds_the_largest_batch_that_fits(largest, limit):
  tried = []
  def fits(n):
    tried.append(n)
    return n <= largest
  assert report.largest_fitting(fits, limit) == min(largest, limit)
  assert len(tried) <= 2 * limit.bit_length() + 1 and max(tried) <= limit


_HLO = """HloModule step

%all-reduce-scatter.3 (input.3: f32[64,256]) -> f32[8,256] {
  %all-reduce.9 = f32[64,256]{1,0} all-reduce(%input.3), replica_groups={{0,1,2,3,4,5,6,7}}
  ROOT %slice = f32[8,256]{1,0} dynamic-slice(%all-reduce.9, %p, %q), dynamic_slice_sizes={8,256}
}

ENTRY %main (p0: bf16[8,256]) -> f32[8,256] {
  %ag = bf16[64,256]{1,0} all-gather(%p0), dimensions={0}, metadata={op_name="jit(f)/dot"}
  %ags = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%p1), dimensions={0}
  %agd = bf16[64,128]{1,0} all-gather-done(%ags)
  %ar = (f32[16]{0}, f32[3,3,32,32]{3,2,1,0}) all-reduce(%a, %b), replica_groups=[2,4]<=[8]
  %rs = f32[8,256]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3
  %a2a = f32[4,4,16]{2,1,0} all-to-all(%x), dimensions={0}
  %cps = (f32[32]{0}, f32[32]{0}, u32[], u32[]) collective-permute-start(%y)
  ROOT %cpd = f32[32]{0} collective-permute-done(%cps)
}
"""


def test_collectives_read_from_hlo_text():
  found = hlo.collectives(_HLO)
  table = hlo.summary(found)
  assert table["all-gather"] == {"count": 2, "bytes": 64 * 256 * 2 + 64 * 128 * 2}
  assert table["reduce-scatter"] == {"count": 1, "bytes": 64 * 256 * 4}
  assert table["all-reduce"] == {"count": 1, "bytes": (16 + 9 * 32 * 32) * 4}
  assert table["all-to-all"] == {"count": 1, "bytes": 4 * 4 * 16 * 4}
  assert table["collective-permute"] == {"count": 1, "bytes": 32 * 4}
  combined = hlo.by_kind(found)["all-reduce"][0]
  assert [shape for _, shape in combined.arrays] == ["f32[16]", "f32[3,3,32,32]"]
  assert hlo.by_kind(found)["all-gather"][0].op_name == "jit(f)/dot"
  # A combined all-reduce carries one array's metadata: not named as every array's origin.
  assert plan.collective_origin(combined) == "one of 2 arrays in a combined all-reduce"
  assert plan.collective_origin(hlo.by_kind(found)["all-gather"][0]) == "jit(f)/dot"


_PROBE = """
import sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pixeldance_jax.runtime import host_memory
from pixeldance_jax.aot import plan, topology
from pixeldance_jax.models import layers
host_memory.quiet_libtpu()
for name in sys.argv[1:]:
  devices = topology.devices(topology.parse(name))
  mesh = Mesh(np.array(devices).reshape(1, len(devices), 1), ("data", "fsdp", "tensor"))
  print(name, plan.reduce_scatter_lowering(mesh))
# A U-Net attention layer's outputs and gradients at 128 positions (one splash block), batch
# sharded over the last slice's chips.
attention = layers.Attention(heads=2, head_dim=64, impl="splash")
x = jax.ShapeDtypeStruct((4, 128, 128), jnp.float32,
                         sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
params = jax.eval_shape(lambda: attention.init(jax.random.key(0), jnp.zeros(x.shape)))
loss = lambda p, x: jnp.sum(attention.apply(p, x))
with jax.set_mesh(mesh):
  text = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
print("splash kernels", text.count('custom_call_target="tpu_custom_call"'))
"""


@pytest.fixture(scope="module")
def probed() -> list[str]:
  """The probe's lines, once: a subprocess, as libtpu's compiler needs its own process here."""
  return processes.run_python("-c", _PROBE, "v5e-8", "v5p-16", "v5p-8").stdout.splitlines()


@needs_libtpu
def test_how_libtpu_lowers_a_reduce_scatter_on_one_host_and_across_hosts(probed):
  """An explicit reduce-scatter over every chip is one on a single-host slice, and an all-reduce
  of the whole array where the group spans hosts: what the sharding check compares with."""
  assert probed[-4:-1] == ["v5e-8 reduce-scatter", "v5p-16 all-reduce",
                           "v5p-8 reduce-scatter"], probed


@needs_libtpu
def test_splash_attention_compiles_to_mosaic_kernels_for_a_tpu_slice(probed):
  """config.unet.attention_impl="splash" on a TPU target: Pallas kernels (forward, dq, dkv)
  as Mosaic custom calls, not the interpreter's XLA loops."""
  kernels = int(probed[-1].removeprefix("splash kernels "))
  assert kernels >= 3, probed


def _aot(tmp_path, name, *flags):
  report = tmp_path / f"{name}.json"
  result = processes.run_python(
      "-m", "pixeldance_jax.aot", "--config=configs/unit_test.py", *helpers.one_level_flags(),
      "--config.mesh.data=1", "--config.mesh.fsdp=4", f"--json={report}", *flags, check=False)
  return result, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.slow
@needs_libtpu
def test_unit_test_train_step_compiles_for_a_tpu_slice(tmp_path):
  """The train step's gradients program, compiled by libtpu for a 4-chip v5p slice: memory
  plan, FLOPs, collectives, and the sharding the rules ask for. Planned against 0.05 GiB per
  chip, the gradients (~90 MB) do not fit: the report says NO and the exit status is 1. (Each
  program is a quarter of a minute of libtpu compile on this CPU, so one: the sampler and the
  update, whose donation tests/test_train.py checks on the CPU, go through the same
  `--programs` code; splash attention's kernels are compiled by the probe above.)"""
  result, report = _aot(tmp_path, "slice", "--topology=v5p-8", "--per_chip=1",
                        "--config.separate_update=True", "--programs=train_step",
                        "--hbm_gib=0.05", f"--hlo_dir={tmp_path / 'hlo'}")
  assert result.returncode == 1, result.stderr[-3000:]
  assert (tmp_path / "hlo" / "train_step.hlo.txt").read_text().startswith("HloModule")
  assert (report["chips"], report["hosts"], report["mesh"]["fsdp"]) == (4, 1, 4)
  assert report["device_kind"].startswith("TPU v5")
  assert set(report["programs"]) == {"train_step"}
  program = report["programs"]["train_step"]
  assert not program["fits"]
  assert program["total_bytes"] > program["capacity_bytes"] == int(0.05 * 2**30)
  assert program["flops"] > 0 and program["bytes_accessed"] > 0
  assert program["compile_seconds"] > 0
  assert program["collectives"]["all-gather"]["count"] > 0  # fsdp gathers weights.
  assert "collectives in train_step" in result.stdout and "NO" in result.stdout
  sharding = report["sharding"]
  assert sharding["replicated"] == []
  assert sharding["activation_gathers"] == []
  assert sharding["reduce_scatters"] > 0
  assert sharding["reduce_scatter_lowering"] == "reduce-scatter"
