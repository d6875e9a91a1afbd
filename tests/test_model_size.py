"""benchmarks/model_size.py: the per-device memory estimate from shapes, and XLA's plan."""

import pathlib
import sys

import pytest

import helpers
from configs import unit_test

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import model_size  # pylint: disable=wrong-import-position

POLICIES = ("none", "dots_saveable", "nothing_saveable", "full")
ONE_DEVICE = (1, 1, 1)


@pytest.fixture(name="trace", scope="module")
def fixture_trace():
  return model_size.LossTrace(unit_test.get_config())


@pytest.fixture(name="estimates", scope="module")
def fixture_estimates(trace):
  return model_size.activation_estimates(unit_test.get_config(), POLICIES, trace)


@pytest.mark.slow
def test_activations_fall_as_policies_save_less(estimates):
  kept = {policy: estimates[policy]["saved"] for policy in POLICIES}
  assert kept["none"] > kept["dots_saveable"] > kept["nothing_saveable"] > 0
  assert kept["nothing_saveable"] == pytest.approx(kept["full"])
  per_example = {policy: estimates[policy]["per_example"] for policy in POLICIES}
  assert per_example["none"] >= per_example["dots_saveable"] >= per_example["nothing_saveable"]
  # Recomputing a layer costs its residuals again in its backward pass; never without remat.
  assert estimates["none"]["layer"] == 0 < estimates["full"]["layer"]
  assert estimates["dots_saveable"]["layer"] <= estimates["full"]["layer"]


@pytest.mark.slow
def test_swapped_policy_is_what_the_model_traces(trace):
  """The policy swapped into the once-traced loss gives the residuals of the model traced with
  that `config.unet.remat_policy`."""
  policy = "dots_saveable"
  assert trace.residuals(policy) == model_size.loss_residuals(unit_test.get_config(), policy)


@pytest.mark.slow
def test_largest_batch_grows_with_memory(estimates):
  state = model_size.state_gib(unit_test.get_config(), ONE_DEVICE)
  for policy in POLICIES:
    batches = [model_size.largest_batch(state, estimates[policy], gib, 0.1)
               for gib in (0.01, 0.1, 1.0, 16.0)]
    assert batches[0] == 0  # The state alone does not fit 90% of 10 MiB.
    assert batches == sorted(batches) and batches[-1] > batches[1] > 0
    fits = model_size.estimate_gib(state, estimates[policy], batches[-1])
    assert fits <= 0.9 * 16.0 < model_size.estimate_gib(state, estimates[policy],
                                                         batches[-1] + 1)
  at_16 = {policy: model_size.largest_batch(state, estimates[policy], 16.0, 0.1)
           for policy in POLICIES}
  assert at_16["none"] <= at_16["dots_saveable"] <= at_16["full"]


def test_device_memory_table():
  assert model_size.device_memory_gib("NVIDIA H100 80GB HBM3") == model_size.device_memory_gib(
      "h100")
  assert model_size.device_memory_gib("NVIDIA H200") > model_size.device_memory_gib("h100")
  assert model_size.device_memory_gib("TPU v5 lite") == model_size.device_memory_gib("v5e") == 16
  assert model_size.device_memory_gib("TPU v5") == model_size.device_memory_gib("v5p")
  assert model_size.device_memory_gib("h100", override=40.0) == 40.0
  with pytest.raises(ValueError, match="device_memory_gib"):
    model_size.device_memory_gib("cpu")
  assert model_size.parse_mesh("1x8x1") == (1, 8, 1)
  with pytest.raises(ValueError):
    model_size.parse_mesh("1x-1x1")


@pytest.mark.slow
def test_estimate_is_near_xla_plan():
  """Within a sane factor of XLA's plan (arguments + outputs - aliases + temporaries) for the
  compiled step: the one-level unit-test U-Net (the suite's shared program), no remat (XLA's CPU
  pipeline undoes remat), batch 4 on one device."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  state = model_size.state_gib(config, ONE_DEVICE)
  estimate = model_size.estimate_gib(
      state, model_size.activation_estimates(config, ["none"])["none"], config.batch_size)
  run_config = model_size.on_mesh(config, ONE_DEVICE, "none", config.batch_size)
  compiled, _ = model_size.compile_step(run_config, model_size.common.make_mesh(ONE_DEVICE))
  plan = model_size.xla_plan_gib(compiled)
  # The state but the gradients is an argument.
  assert plan["args"] >= model_size.state_total(state) - state["grads"]
  assert 0.75 < estimate / plan["total"] < 1.5, (estimate, plan)
