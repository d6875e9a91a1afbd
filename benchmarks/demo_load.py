"""A load test of the web demo on loopback: concurrent clients, valid and bad requests mixed.

  python benchmarks/demo_load.py --workdir=workdirs/tiny [--clients=8] [--seconds=120]

Serves the demo over the run's checkpoint on 127.0.0.1 (any free port), then `--clients`
threads post requests for `--seconds`, each cycling through: a valid request (2 sampler
steps, a held-out first frame), a body that is not JSON, an unknown field, a body over the
size limit, an image over the pixel limit and a non-JSON content type. Prints one JSON line:
requests and statuses per kind, latency p50 / p99 of the valid ones, the server process's RSS
before and after (after a warm-up request), and the checks: valid requests that got anything
but 200 or 503 (queue full), bad ones answered without a 4xx / 503 and a message, 500s, and
outputs left half-written.
"""

import base64
import collections
import http.client
import io
import itertools
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
from absl import flags
from PIL import Image

_BAD_STATUSES = (400, 413, 415, 503)


def _png_data_url(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _kinds(num_heldout: int) -> dict[str, tuple[bytes, dict[str, str]]]:
  """Request kind -> (body, headers). Bodies are built once."""
  json_headers = {"Content-Type": "application/json"}
  huge = _png_data_url(np.zeros((4100, 4100, 3), np.uint8))
  first = {"heldout": 0} if num_heldout else {"image": _png_data_url(
      np.zeros((64, 64, 3), np.uint8))}
  return {
      "valid": (json.dumps({"prompt": "a red square moves to the left", "first_frame": first,
                            "steps": 2}).encode(), json_headers),
      "not_json": (b"{not json", json_headers),
      "unknown_field": (json.dumps({"prompt": "x", "first_frame": first, "taus": 3}).encode(),
                        json_headers),
      "too_large_body": (b"", {**json_headers, "Content-Length": str(1 << 40)}),
      "too_large_image": (json.dumps({"prompt": "x", "first_frame": {"image": huge}}).encode(),
                          json_headers),
      "wrong_type": (b'{"prompt": "x"}', {"Content-Type": "text/plain"}),
  }


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
  """(status, body) of POST /api/generate; status 0 when the connection failed."""
  parts = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
  try:
    connection.putrequest("POST", "/api/generate")
    for name, value in {"Content-Length": str(len(body)), **headers}.items():
      connection.putheader(name, value)
    connection.endheaders()
    if body:
      connection.send(body)
    response = connection.getresponse()
    return response.status, response.read()
  except (OSError, http.client.HTTPException):
    return 0, b""
  finally:
    connection.close()


def _has_message(body: bytes) -> bool:
  try:
    return bool(json.loads(body).get("error"))
  except (ValueError, AttributeError):
    return False


def run_load(url: str, output_dir: str, *, clients: int = 8, seconds: float = 120.0
             ) -> dict:
  """Runs the load against the demo at `url` (writing into `output_dir`); the summary."""
  info = json.loads(urllib.request.urlopen(url.split("?")[0] + "api/info", timeout=60).read())
  kinds = _kinds(len(info["heldout"]))
  statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  latencies, problems = [], collections.Counter()
  lock = threading.Lock()
  deadline = time.perf_counter() + seconds

  def client(offset: int) -> None:
    for name in itertools.islice(itertools.cycle(kinds), offset, None):
      if time.perf_counter() > deadline:
        return
      body, headers = kinds[name]
      start = time.perf_counter()
      status, answer = _post(url, body, headers)
      with lock:
        statuses[name][status] += 1
        if name == "valid":
          latencies.append(time.perf_counter() - start)
          problems["valid_failures"] += status not in (200, 503)
        else:
          problems["bad_without_message"] += (status not in _BAD_STATUSES
                                              or not _has_message(answer))
        problems["server_errors"] += status >= 500 and status != 503

  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  folders = os.listdir(output_dir)
  half_written = sum(name.startswith(".request-") or not os.path.exists(
      os.path.join(output_dir, name, "record.json")) for name in folders)
  return {"clients": clients, "seconds": seconds,
          "requests": sum(sum(c.values()) for c in statuses.values()),
          "statuses": {name: {str(k): v for k, v in sorted(c.items())}
                       for name, c in statuses.items()},
          "valid_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
          "valid_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
          "valid_failures": problems["valid_failures"],
          "bad_without_message": problems["bad_without_message"],
          "server_errors": problems["server_errors"], "half_written": half_written}


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # pylint: disable=import-outside-toplevel
  from pixeldance_jax.cli import console
  from pixeldance_jax.demo import app
  workdir = flags.DEFINE_string("workdir", None, "Training workdir of the demo's checkpoint.")
  clients = flags.DEFINE_integer("clients", 8, "Concurrent clients.")
  seconds = flags.DEFINE_float("seconds", 120.0, "How long the clients post.")
  output_dir = flags.DEFINE_string("output_dir", None, "Outputs (default: a new folder under "
                                   "WORKDIR/demo_load).")
  flags.mark_flags_as_required(["workdir"])

  def run(argv):
    del argv
    folder = output_dir.value or os.path.join(workdir.value, "demo_load",
                                              time.strftime("%Y%m%d-%H%M%S"))
    demo = app.load_demo(workdir.value, output_dir=folder, num_heldout=16)
    server = app.start_server(demo, "127.0.0.1", 0)
    try:
      demo.warm_up().result()
      _post(server.url, *_kinds(len(demo.heldout))["valid"])
      before = _rss_mib()
      summary = run_load(server.url, demo.output_dir, clients=clients.value,
                         seconds=seconds.value)
      summary.update(rss_before_mib=round(before, 1), rss_after_mib=round(_rss_mib(), 1))
      print(json.dumps(summary))
    finally:
      server.shutdown()
      server.server_close()
      demo.close()
  console.run(run)


if __name__ == "__main__":
  main()
