"""Subprocess helpers shared by the tests that run the entry points as users do."""

import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# XLA CPU flags for the suite (see conftest.py): LLVM at -O0 without its expensive passes, and
# XLA's fast-compile preset of HLO passes, since the suite compiles far more than it runs
# (docs/benchmarks.md). (Not --xla_cpu_use_fusion_emitters=false: a batch then rounds unlike
# its rows.)
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE")


def with_fast_compile(xla_flags: str) -> str:
  return xla_flags if "xla_backend_optimization_level" in xla_flags else (
      f"{xla_flags} {FAST_COMPILE}".strip())


def cpu_env(devices: int = 1) -> dict[str, str]:
  """The environment of a child process on the CPU with `devices` fake devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_fast_compile(
      f"--xla_force_host_platform_device_count={devices}"))


def process_group_env(devices: int = 1, processes: int = 2) -> dict[str, str]:
  """`cpu_env` for one of `processes` processes joined by `jax.distributed`, with a persistent
  compilation cache of their own: the cache key does not tell the processes of a group from one
  process with as many devices, so a member that shared the single-process cache could load
  that process's program and skip the cross-process collectives (seen: process 0 finished
  while process 1 waited in its first step). Groups of one shape share programs, as the hosts
  of a pod share one cache."""
  env = cpu_env(devices)
  if "JAX_COMPILATION_CACHE_DIR" in env:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        env["JAX_COMPILATION_CACHE_DIR"], f"group_{processes}x{devices}")
  return env


def run_python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  """`python ARGS` in the repository root; with `check`, a failure shows the output's tail."""
  result = subprocess.run([sys.executable, *args], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
  return result


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


class ProcessGroup:
  """`commands` started at once, each process's stderr to a file of its own in `log_dir`: a
  process that logs more than a pipe holds never blocks while its peers wait for it in a
  collective (reading the pipes one after the other would deadlock). A failure or a timeout
  kills them all."""

  def __init__(self, commands: list[list[str]], env: dict[str, str], log_dir: pathlib.Path):
    log_dir.mkdir(parents=True, exist_ok=True)
    self.log_paths = [log_dir / f"process_{index}.log" for index in range(len(commands))]
    self.processes = []
    for command, path in zip(commands, self.log_paths):
      with open(path, "w") as log:
        self.processes.append(subprocess.Popen(command, cwd=REPO, env=env, stderr=log,
                                               stdout=subprocess.DEVNULL))

  def wait(self, timeout: float = 600) -> list[str]:
    """Each process's log, once all have exited with status 0 (else AssertionError)."""
    try:
      for process in self.processes:
        process.wait(timeout=timeout)
    finally:
      self.kill()
    logs = [path.read_text() for path in self.log_paths]
    for index, (process, log) in enumerate(zip(self.processes, logs)):
      assert process.returncode == 0, f"process {index}:\n{log[-4000:]}"
    return logs

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
