"""Starting the demo: restore the weights once, load some held-out clips, serve until Ctrl-C."""

import os
import signal
import threading

from absl import logging

from pixeldance_jax.data import loaders
from pixeldance_jax.demo import server as server_lib
from pixeldance_jax.demo import service
from pixeldance_jax.sampling import outputs
from pixeldance_jax.sampling import pipeline as pipeline_lib


def heldout_clips(pipeline: pipeline_lib.Pipeline, count: int) -> list[dict]:
  """Up to `count` held-out clips of the run's dataset (built if missing), or none, with a
  warning, when the checkpoint has no dataset to read (uploads still work)."""
  if count <= 0:
    return []
  config = pipeline.config
  try:
    source = loaders.test_source(config, loaders.data_dir(config, pipeline.workdir))
    return [loaders.decode_record(source[index], config.data.frames)
            for index in range(min(count, len(source)))]
  except (FileNotFoundError, ValueError) as error:
    logging.warning("No held-out clips (%s): the page takes uploaded frames only.", error)
    return []


def load_demo(workdir: str, *, checkpoint_step: int | None = None, use_ema: bool = True,
              output_dir: str | None = None, num_heldout: int = 64, **options) -> service.Demo:
  """A `Demo` over the latest (or given) checkpoint of `workdir`; outputs go to `output_dir`
  (default WORKDIR/demo). `options`: `service.Demo`'s keyword arguments."""
  output_dir = output_dir or os.path.join(workdir, "demo")
  outputs.check_writable(output_dir, folder=True)
  pipeline = pipeline_lib.load_pipeline(workdir, checkpoint_step, use_ema)
  heldout = heldout_clips(pipeline, num_heldout)
  return service.Demo(pipeline, heldout, output_dir, **options)


def start_server(demo: service.Demo, host: str = "127.0.0.1", port: int = 7860,
                 token: str = "") -> server_lib.DemoServer:
  """The server, listening (port 0: any free port) and serving on a daemon thread."""
  try:
    server = server_lib.DemoServer(demo, host, port, token=token)
  except OSError as error:
    raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                     "pass another --port") from error
  threading.Thread(target=server.serve_forever, name="demo-http", daemon=True).start()
  return server


def _report_warm_up(future) -> None:
  if not future.cancelled() and future.exception() is not None:
    logging.error("The warm-up failed (requests will show the error): %s", future.exception())


def _interrupt(signum, frame):  # pylint: disable=unused-argument
  raise KeyboardInterrupt


def serve(demo: service.Demo, host: str = "127.0.0.1", port: int = 7860,
          warm_up: bool = True, token: str = "") -> None:
  """Serves the page until Ctrl-C or SIGTERM, then stops taking requests and finishes the
  one being sampled. Call it from the main thread."""
  signal.signal(signal.SIGTERM, _interrupt)
  server = start_server(demo, host, port, token)
  if not server.loopback and not token:
    logging.warning("SERVING ON %s WITHOUT A TOKEN: anyone who can reach this address can "
                    "generate videos and read every output. Pass --token=<secret> to ask "
                    "for one.", host)
  logging.info("Serving the demo at %s (outputs in %s); Ctrl-C stops it.", server.url,
               demo.output_dir)
  if warm_up:
    logging.info("Compiling the sampling program (requests wait for it)...")
    demo.warm_up().add_done_callback(_report_warm_up)
  try:
    threading.Event().wait()
  except KeyboardInterrupt:
    logging.info("Stopping the demo.")
  finally:
    server.shutdown()
    server.server_close()
    demo.close()
