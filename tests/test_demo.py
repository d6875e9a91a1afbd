"""The web demo end to end: a server on 127.0.0.1 over a saved unit-test checkpoint, driven
through its HTTP API and, in headless Chromium, through its page."""

import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import browser
import helpers
from benchmarks import demo_load
from configs import unit_test
from pixeldance_jax.io import checkpoints
from pixeldance_jax.demo import app, service
from pixeldance_jax.demo import server as server_lib
from pixeldance_jax.models import pixeldance
from pixeldance_jax.parallel import mesh as mesh_lib
from pixeldance_jax.sampling import generate as generate_lib
from pixeldance_jax.sampling import program

# Multi-process, end-to-end or browser: the full suite's tier (README, Developing).
pytestmark = pytest.mark.slow

# The page's controls (element ids) that the issue asks for.
CONTROLS = ("prompt", "first-heldout", "first-upload", "last-source", "last-heldout",
            "last-upload", "last-edges", "sketch", "tau", "guidance_scale", "steps", "sampler",
            "seed", "num_clips", "overlap_frames", "redraw_frames", "add-keyframe", "generate")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """A demo over a saved checkpoint of random one-level unit-test weights (the fastest to
  compile), with its dataset's 4 held-out clips, compiled once (warm-up)."""
  config = unit_test.get_config()
  config.update_from_flattened_dict(helpers.ONE_LEVEL_UNET)
  workdir = str(tmp_path_factory.mktemp("demo_run"))
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract_params, _ = pixeldance.abstract_weights(config, mesh)
  params = jax.device_put(helpers.random_params(config, seed=1),
                          jax.tree.map(lambda x: x.sharding, abstract_params))
  checkpoints.save_pretrained(workdir, params, {}, config)
  demo = app.load_demo(workdir, num_heldout=16, max_clips=3)
  demo.warm_up().result()
  yield demo
  demo.close()


@pytest.fixture(scope="module")
def server(demo):
  server = app.start_server(demo, "127.0.0.1", 0)
  yield server
  server.shutdown()
  server.server_close()


def _get(server, path):
  with urllib.request.urlopen(server.url + path.lstrip("/"), timeout=60) as response:
    return response.headers["Content-Type"], response.read()


def _post(server, payload, raw=None):
  """(status, JSON body) of POST /api/generate."""
  data = raw if raw is not None else json.dumps(payload).encode()
  request = urllib.request.Request(server.url + "api/generate", data=data, method="POST",
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as error:
    return error.code, json.loads(error.read())


def _png_data_url(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _frames(demo, name):
  folder = os.path.join(demo.output_dir, name, "frames")
  return np.stack([np.asarray(Image.open(os.path.join(folder, file)))
                   for file in sorted(os.listdir(folder))])


def _outputs(demo):
  return sorted(os.listdir(demo.output_dir))


def test_info_page_and_heldout_frames(demo, server):
  _, body = _get(server, "/api/info")
  info = json.loads(body)
  assert len(info["heldout"]) == 4  # The unit-test dataset holds 4 held-out clips.
  assert info["heldout"][0]["caption"] == demo.heldout[0]["caption"] != ""
  assert info["defaults"]["steps"] == 4 and info["defaults"]["tau"] == 2
  assert info["image_size"] == 16 and info["frames"] == 4 and "ddim" in info["samplers"]
  content_type, png = _get(server, "/api/heldout/2/last.png")
  assert content_type == "image/png"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                demo.heldout[2]["video"][-1])
  content_type, html = _get(server, "/")
  assert content_type.startswith("text/html")
  for control in CONTROLS:
    assert f'id="{control}"'.encode() in html


def test_generate_with_and_without_a_last_frame_reuses_the_program(demo, server):
  traces = sum(program.trace_counts.values())
  status, basic = _post(server, {"prompt": "a red square moves to the right",
                                 "first_frame": {"heldout": 1}, "seed": 3})
  assert status == 200, basic
  assert basic["record"]["mode"] == "basic" and basic["record"]["tau"] == 0
  # The demo samples exactly what the library samples for the same inputs and seed.
  expected = generate_lib.generate(demo.pipeline, ["a red square moves to the right"],
                                   demo.heldout[1]["video"][:1], seed=3)[0]
  np.testing.assert_array_equal(_frames(demo, basic["name"]), np.repeat(np.repeat(
      expected, demo.upscale, axis=1), demo.upscale, axis=2))  # Written upscaled (nearest).
  _, mp4 = _get(server, basic["urls"]["mp4"])
  assert mp4[4:8] == b"ftyp"
  _, record = _get(server, basic["urls"]["record"])
  assert json.loads(record)["name"] == basic["name"]

  status, magic = _post(server, {"prompt": "a red square moves to the right",
                                 "first_frame": {"heldout": 1}, "last_frame": {"heldout": 3},
                                 "tau": 3, "guidance_scale": 4.5, "steps": 3, "seed": 5,
                                 "num_clips": 2})
  assert status == 200, magic
  assert magic["record"]["mode"] == "long video (2 clips, magic ending)"
  assert magic["record"]["tau"] == 3 and magic["record"]["steps"] == 3
  assert not basic["compiled"] and not magic["compiled"]
  assert sum(program.trace_counts.values()) == traces  # Warm-up compiled it; nothing since.
  assert len(_frames(demo, magic["name"])) == 2 * 4 - 1


def test_uploaded_frames_and_sketches(demo, server):
  first = demo.heldout[0]["video"][0]
  common = {"prompt": "a blue circle moves up", "seed": 7}
  _, from_clip = _post(server, {**common, "first_frame": {"heldout": 0}})
  status, uploaded = _post(server, {**common, "first_frame": {"image": _png_data_url(first)}})
  assert status == 200, uploaded
  assert uploaded["record"]["first_frame"] == "upload: inputs/first_frame.png"
  np.testing.assert_array_equal(_frames(demo, uploaded["name"]), _frames(demo, from_clip["name"]))

  sketch = np.full((64, 64, 3), 255, np.uint8)
  sketch[20:44, 30:34] = 0
  status, sketched = _post(server, {**common, "first_frame": {"heldout": 0},
                                    "last_frame": {"sketch": _png_data_url(sketch)}})
  assert status == 200, sketched
  assert sketched["record"]["mode"] == "sketch"
  status, edges = _post(server, {**common, "first_frame": {"heldout": 0},
                                 "last_frame": {"heldout": 2}, "last_frame_edges": True})
  assert status == 200 and edges["record"]["mode"] == "sketch"
  _, last = _get(server, edges["urls"]["last_frame"])
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(last))),
                                demo.heldout[2]["video"][-1])  # The input as given.


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not JSON"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "taus": 3}, "unknown field(s) ['taus']"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "tau": -1}, "tau=-1 must be >= 0"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "steps": 5000}, "steps=5000 must be in"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "sampler": "euler"}, "sampler='euler'"),
    ({"prompt": "x", "first_frame": {"heldout": 9}}, "held-out clip 9 does not exist (0 to 3)"),
    ({"prompt": "x"}, "first_frame must be an object"),
    ({"prompt": "x", "first_frame": {"image": "%%%"}}, "not valid base64"),
    ({"prompt": "x", "first_frame": {"image": "aGVsbG8="}}, "not an image"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "num_clips": 4}, "--max_clips=3"),
    ({"prompt": "a\nb\nc", "first_frame": {"heldout": 0}, "num_clips": 2},
     "3 prompt lines for num_clips=2"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "seed": 2**32}, "seed=4294967296 must be"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "keyframes": {"3": {"heldout": 0}}},
     "keyframe 3 is outside 1..2"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "keyframes": {"x": {"heldout": 0}}},
     "keyframe index 'x' is not a frame number"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "keyframes": {"1": {"video": 0}}},
     "keyframe 1 must be an object with one key of"),
    ({"prompt": "x", "first_frame": {"heldout": 0}, "overlap_frames": 3, "num_clips": 2},
     "overlap_frames=3 must be at most 2"),
])
def test_bad_input_is_an_error_and_the_server_keeps_serving(demo, server, payload, message):
  before = _outputs(demo)
  status, body = _post(server, None, raw=payload) if isinstance(payload, bytes) else _post(
      server, payload)
  assert status == 400 and message in body["error"], body
  assert _outputs(demo) == before  # Nothing half-written.
  assert json.loads(_get(server, "/api/info")[1])["waiting"] == 0


def test_requests_are_queued_one_at_a_time(demo, server, monkeypatch):
  """Three requests at once: each is sampled, never two at the same time."""
  lock, running, most = threading.Lock(), [0], [0]
  run_requests = service.requests_lib.run_requests

  def counted(*args, **kwargs):
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
    try:
      time.sleep(0.2)  # Long enough for the others to arrive, were they let in.
      yield from run_requests(*args, **kwargs)
    finally:
      with lock:
        running[0] -= 1

  monkeypatch.setattr(service.requests_lib, "run_requests", counted)
  payload = {"prompt": "a green star moves down", "first_frame": {"heldout": 1}, "steps": 2}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = list(pool.map(lambda _: _post(server, payload), range(3)))
  assert [status for status, _ in results] == [200] * 3, results
  assert len({body["name"] for _, body in results}) == 3
  assert most[0] == 1


def test_a_full_queue_answers_busy(demo, server):
  release = threading.Event()
  demo._executor.submit(release.wait)  # pylint: disable=protected-access  # Occupies the worker.
  limit, demo.max_waiting = demo.max_waiting, 1
  try:
    payload = {"prompt": "x", "first_frame": {"heldout": 0}}
    waiting = threading.Thread(target=_post, args=(server, payload))
    waiting.start()
    WebDriverWait(None, 10, 0.05).until(
        lambda _: json.loads(_get(server, "/api/info")[1])["waiting"] == 1)
    status, body = _post(server, payload)
    assert status == 503 and "already waiting" in body["error"]
  finally:
    demo.max_waiting = limit
    release.set()
  waiting.join(60)


def _request(server, path, method="GET", data=None, headers=None, url=None):
  """(status, headers, body) of a request with the given headers."""
  request = urllib.request.Request((url or server.url.split("?")[0]) + path.lstrip("/"),
                                   data=data, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as error:
    return error.code, error.headers, error.read()


def test_other_sites_hosts_and_bodies_are_refused(server):
  """A page elsewhere cannot post to the demo; a rebound DNS name cannot reach it; the API
  takes JSON only."""
  valid = json.dumps({"prompt": "x", "first_frame": {"heldout": 0}, "steps": 1}).encode()
  for headers, status, message in (
      ({"Content-Type": "text/plain"}, 415, "application/json"),
      ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403,
       "another site"),
      ({"Content-Type": "application/json", "Host": "evil.example"}, 403, "loopback")):
    code, _, body = _request(server, "/api/generate", "POST", valid, headers)
    assert code == status and message in json.loads(body)["error"], (headers, body)
  code, _, body = _request(server, "/api/info", headers={"Host": "rebound.example:80"})
  assert code == 403
  info = json.loads(_get(server, "/api/info")[1])
  assert "workdir" not in info and os.sep not in info["run"]


def test_uploads_past_the_limits_are_413_and_other_formats_400(demo, server):
  before = _outputs(demo)
  huge = np.zeros((4100, 4100, 3), np.uint8)  # 16.8 M pixels in a small PNG.
  status, body = _post(server, {"prompt": "x", "first_frame": {"image": _png_data_url(huge)}})
  assert status == 413 and "pixels" in body["error"], body
  gif = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(gif, format="GIF")
  status, body = _post(server, {"prompt": "x", "first_frame": {
      "image": base64.b64encode(gif.getvalue()).decode()}})
  assert status == 400 and "not an image" in body["error"], body
  status, body = _post(server, {"prompt": "x" * 3000, "first_frame": {"heldout": 0}})
  assert status == 400 and "3000 characters" in body["error"]
  assert _outputs(demo) == before


def test_outputs_have_unguessable_names_and_the_oldest_go(demo, server):
  limit, demo.max_outputs = demo.max_outputs, 2
  try:
    names = [_post(server, {"prompt": "x", "first_frame": {"heldout": 0}, "steps": 1,
                            "seed": seed})[1]["name"] for seed in range(3)]
  finally:
    demo.max_outputs = limit
  assert all(service.OUTPUT_NAME.match(name) for name in names), names
  assert _outputs(demo) == sorted(names[1:])  # The oldest went.
  code, _, _ = _request(server, f"/outputs/{names[0]}/record.json")
  assert code == 404


def test_a_failure_inside_sampling_is_a_500_and_leaves_nothing(demo, server, monkeypatch,
                                                                caplog):
  def broken(*args, **kwargs):
    raise ValueError("the device fell over")
    yield  # pylint: disable=unreachable
  monkeypatch.setattr(service.requests_lib, "run_requests", broken)
  before = _outputs(demo)
  with caplog.at_level("ERROR"):
    status, body = _post(server, {"prompt": "x", "first_frame": {"heldout": 0}})
  assert status == 500 and "the device fell over" in body["error"], body
  assert "Traceback" in caplog.text
  assert _outputs(demo) == before and not any(
      name.startswith(".request-") for name in os.listdir(demo.output_dir))


def test_a_token_guards_every_route_and_a_cookie_keeps_it(demo):
  guarded = app.start_server(demo, "127.0.0.1", 0, token="s3cret")
  try:
    base = guarded.url.split("?")[0]
    assert guarded.url.endswith("?token=s3cret")
    code, _, body = _request(guarded, "/api/info", url=base)
    assert code == 401 and "token" in json.loads(body)["error"]
    code, headers, _ = _request(guarded, "/?token=s3cret", url=base)
    assert code == 200 and "HttpOnly" in headers["Set-Cookie"]
    cookie = headers["Set-Cookie"].split(";")[0]
    assert _request(guarded, "/api/info", url=base, headers={"Cookie": cookie})[0] == 200
    assert _request(guarded, "/api/info", url=base,
                    headers={"Cookie": cookie.replace("s3cret", "guess")})[0] == 401
  finally:
    guarded.shutdown()
    guarded.server_close()


def test_silent_clients_time_out_and_connections_are_capped(demo, monkeypatch):
  monkeypatch.setattr(server_lib.Handler, "timeout", 0.5)
  capped = server_lib.DemoServer(demo, "127.0.0.1", 0, max_connections=1)
  threading.Thread(target=capped.serve_forever, daemon=True).start()
  try:
    host, port = capped.server_address[:2]
    silent = socket.create_connection((host, port))  # Holds the one slot, sends nothing.
    time.sleep(0.1)
    code, _, body = _request(capped, "/api/info")
    assert code == 503 and b"too many connections" in body
    time.sleep(1.0)  # The silent one timed out, freeing its slot.
    assert _request(capped, "/api/info")[0] == 200
    silent.close()
  finally:
    capped.shutdown()
    capped.server_close()


def test_a_load_of_mixed_requests(demo, server):
  """`benchmarks/demo_load.py`'s load, briefly: no 500 on valid input, every bad request a
  4xx or 503 with a message, nothing half-written."""
  summary = demo_load.run_load(server.url, demo.output_dir, clients=4, seconds=3.0)
  assert summary["requests"] > 10 and summary["valid_failures"] == 0, summary
  assert summary["bad_without_message"] == 0 and summary["server_errors"] == 0, summary
  assert summary["half_written"] == 0, summary


def test_the_page_in_chromium_generates_a_video_from_a_sketch_and_a_keyframe(demo, server):
  with browser.chromium() as driver:
    driver.get(server.url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    for control in CONTROLS:
      assert driver.find_element(By.ID, control)
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == demo.heldout[0][
        "caption"]
    # A bad setting shows its error on the page.
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("0")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(
        lambda d: "steps=0 must be" in d.find_element(By.ID, "error").text)
    steps.clear()
    steps.send_keys("3")
    # Draw a stroke on the sketch canvas and generate with it as the last frame.
    Select(driver.find_element(By.ID, "last-source")).select_by_value("sketch")
    canvas = driver.find_element(By.ID, "sketch")
    ActionChains(driver).move_to_element_with_offset(canvas, -40, -40).click_and_hold() \
        .move_by_offset(60, 30).move_by_offset(20, 40).release().perform()
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(
        "const v = document.getElementById('result-video');"
        "return v.readyState >= 2 && v.videoWidth > 0;"))  # Decoded, not just present.
    assert driver.find_element(By.ID, "error").text == ""
    record = json.loads(driver.find_element(By.ID, "result-settings").text)
    assert record["mode"] == "sketch" and record["steps"] == 3
    sketch = np.asarray(Image.open(os.path.join(demo.output_dir, record["name"], "inputs",
                                                "last_frame.png")).convert("L"))
    assert (sketch < 128).any() and (sketch > 128).any()  # The stroke arrived.
    assert driver.find_element(By.ID, "download-mp4").get_attribute("href").endswith(".mp4")
    # A long video continued over 2 frames, a held-out keyframe in its final clip.
    Select(driver.find_element(By.ID, "last-source")).select_by_value("none")
    for control, value in (("num_clips", "2"), ("overlap_frames", "2")):
      field = driver.find_element(By.ID, control)
      field.clear()
      field.send_keys(value)
    driver.find_element(By.ID, "add-keyframe").click()
    slot = driver.find_element(By.ID, "keyframe-0")
    position = slot.find_element(By.CLASS_NAME, "keyframe-index")
    position.clear()
    position.send_keys("2")
    previous = record["name"]
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 120).until(lambda d: previous not in d.find_element(
        By.ID, "result-settings").text and d.find_element(By.ID, "result-settings").text.startswith("{"))
    assert driver.find_element(By.ID, "error").text == ""
    record = json.loads(driver.find_element(By.ID, "result-settings").text)
    assert record["mode"] == "long video (2 clips, 2 frames carried, basic + keyframes at 2 ending)"
    assert record["keyframes"] == {"2": "held-out clip 0"} and record["overlap_frames"] == 2
    keyframe = np.asarray(Image.open(os.path.join(demo.output_dir, record["name"], "inputs",
                                                  "keyframe_2.png")))
    np.testing.assert_array_equal(keyframe, demo.heldout[0]["video"][2])


def test_the_command_names_a_missing_checkpoint(tmp_path):
  result = subprocess.run([sys.executable, "-m", "pixeldance_jax.demo",
                           f"--workdir={tmp_path / 'nowhere'}"], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"pixeldance_jax.demo: error: No checkpoint in {tmp_path / 'nowhere' / 'checkpoints'}")


def test_a_port_in_use_is_named(demo):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
      app.start_server(demo, "127.0.0.1", port)
