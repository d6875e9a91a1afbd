"""The demo's HTTP side: the page, a small JSON API and the generated files (standard library
only: `http.server` with a thread per connection; generation itself is queued by `Demo`).

  GET  /                                   the page
  GET  /api/info                           the model, defaults, held-out clips, queue length
  GET  /api/heldout/<index>/<first|last>.png  a held-out clip's first or last frame
  POST /api/generate                       JSON request (service.parse_request) -> the result:
                                           {"name", "urls": {"mp4", "gif", "contact_sheet",
                                           "record", ...}, "record", "compiled", "seconds", ...}
  GET  /outputs/<name>/<file>              a generated file

Errors are JSON `{"error": "..."}` with status 400 (bad input), 404, 413 (request too large),
503 (queue full) or 500; the server keeps serving after any of them.
"""

import http
import http.server
import io
import json
import mimetypes
import os
import re
from importlib import resources
from typing import Any

from absl import logging
from PIL import Image

from pixeldance_jax.demo import service

MAX_BODY_BYTES = 3 * service.MAX_IMAGE_BYTES  # Two base64 images and the settings.
_HELDOUT = re.compile(r"^/api/heldout/(\d+)/(first|last)\.png$")
_OUTPUT = re.compile(r"^/outputs/(\d{4,})/([\w./-]+)$")


def page() -> bytes:
  return resources.files("pixeldance_jax.demo").joinpath("static/index.html").read_bytes()


def _png(image) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class HttpError(Exception):
  def __init__(self, status: http.HTTPStatus, message: str):
    super().__init__(message)
    self.status = status


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to the server's `demo` (a `service.Demo`)."""
  server_version = "pixeldance-demo"

  @property
  def demo(self) -> service.Demo:
    return self.server.demo

  def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
    logging.debug("%s %s", self.address_string(), format % args)

  def do_GET(self) -> None:  # pylint: disable=invalid-name
    self._respond(self._get)

  def do_POST(self) -> None:  # pylint: disable=invalid-name
    self._respond(self._post)

  def _respond(self, route) -> None:
    try:
      status, content_type, body = route(self.path.split("?", 1)[0])
    except HttpError as error:
      status, content_type, body = error.status, "application/json", _json_error(error)
    except service.Busy as error:
      status, content_type, body = (http.HTTPStatus.SERVICE_UNAVAILABLE, "application/json",
                                    _json_error(error))
    except (ValueError, FileNotFoundError) as error:
      status, content_type, body = (http.HTTPStatus.BAD_REQUEST, "application/json",
                                    _json_error(error))
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("The demo failed on %s %s", self.command, self.path)
      status, content_type, body = (http.HTTPStatus.INTERNAL_SERVER_ERROR, "application/json",
                                    _json_error(f"{type(error).__name__}: {error}"))
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _get(self, path: str) -> tuple[int, str, bytes]:
    if path in ("/", "/index.html"):
      return http.HTTPStatus.OK, "text/html; charset=utf-8", page()
    if path == "/api/info":
      return http.HTTPStatus.OK, "application/json", _json(self.demo.info())
    if match := _HELDOUT.match(path):
      try:
        frame = self.demo.heldout_frame(int(match[1]), match[2])
      except KeyError as error:
        raise HttpError(http.HTTPStatus.NOT_FOUND, str(error.args[0])) from error
      return http.HTTPStatus.OK, "image/png", _png(frame)
    if match := _OUTPUT.match(path):
      return self._output_file(match[1], match[2])
    raise HttpError(http.HTTPStatus.NOT_FOUND, f"no such page: {path}")

  def _output_file(self, name: str, relative: str) -> tuple[int, str, bytes]:
    folder = os.path.realpath(os.path.join(self.demo.output_dir, name))
    path = os.path.realpath(os.path.join(folder, relative))
    if not path.startswith(folder + os.sep) or not os.path.isfile(path):
      raise HttpError(http.HTTPStatus.NOT_FOUND, f"no such output: {name}/{relative}")
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
      return http.HTTPStatus.OK, content_type, f.read()

  def _post(self, path: str) -> tuple[int, str, bytes]:
    if path != "/api/generate":
      raise HttpError(http.HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
    length = int(self.headers.get("Content-Length") or 0)
    if length < 0:
      raise ValueError(f"Content-Length {length} is negative")
    if length > MAX_BODY_BYTES:
      raise HttpError(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                      f"the request is {length >> 20} MiB, more than {MAX_BODY_BYTES >> 20} MiB")
    try:
      payload = json.loads(self.rfile.read(length) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise ValueError(f"the request is not JSON ({error})") from error
    result = self.demo.generate(payload)
    base = f"/outputs/{result['name']}/"
    result["urls"] = {key: base + relative for key, relative in result.pop("files").items()}
    return http.HTTPStatus.OK, "application/json", _json(result)


def _json(value: Any) -> bytes:
  return json.dumps(value).encode()


def _json_error(error: Exception | str) -> bytes:
  return _json({"error": str(error)})


class DemoServer(http.server.ThreadingHTTPServer):
  """A threading HTTP server holding the `Demo` its handlers use."""
  daemon_threads = True

  def __init__(self, demo: service.Demo, host: str = "127.0.0.1", port: int = 7860):
    self.demo = demo
    super().__init__((host, port), Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"
