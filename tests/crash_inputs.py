"""An input reader for the data builders' worker pool tests: light to import (spawned workers
import it), and fatal on purpose for some inputs."""

import os
import signal


def read(path: str) -> str:
  """`path` read, except: "killed" in the name kills the reading process (as the OOM killer
  would); "error" raises an error no reader expects."""
  if "killed" in path:
    os.kill(os.getpid(), signal.SIGKILL)
  if "error" in path:
    raise RuntimeError("the codec gave up")
  return f"{path} read"
