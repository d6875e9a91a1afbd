"""The demo's HTTP side: the page, a small JSON API and the generated files (standard library
only: `http.server` with a thread per connection; generation itself is queued by `Demo`).

  GET  /                                   the page
  GET  /api/info                           the model, defaults, held-out clips, queue length
  GET  /api/heldout/<index>/<first|last|k>.png  a held-out clip's first, last or k-th frame
  POST /api/generate                       JSON request (service.parse_request) -> the result:
                                           {"name", "urls": {"mp4", "gif", "contact_sheet",
                                           "record", ...}, "record", "compiled", "seconds", ...}
  GET  /outputs/<name>/<file>              a generated file

Errors are JSON `{"error": "..."}` with status 400 (bad input), 401 (no token), 403 (another
site's page, or a Host that is not this server), 404, 413 (request or image too large), 415
(not JSON), 503 (queue full, or too many connections) or 500 (the server failed, logged with
its traceback); the server keeps serving after any of them.

Safe to expose: connections time out (`TIMEOUT_SECONDS`) and at most `max_connections` are
served at once; a POST must be JSON, from this server's own page (a matching Origin); served on
loopback, the Host must be a loopback name (no DNS rebinding); with a token, every route asks
for it (`?token=` once, then a cookie).
"""

import hmac
import http
import http.cookies
import http.server
import io
import json
import mimetypes
import os
import re
import threading
import urllib.parse
from importlib import resources
from typing import Any

from absl import logging
from PIL import Image

from pixeldance_jax.demo import service

MAX_BODY_BYTES = 3 * service.MAX_IMAGE_BYTES  # Two base64 images and the settings.
TIMEOUT_SECONDS = 30.0  # A client that sends or reads nothing this long is dropped.
MAX_CONNECTIONS = 32
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
_TOKEN_COOKIE = "pixeldance_demo_token"
_HELDOUT = re.compile(r"^/api/heldout/(\d+)/(first|last|\d+)\.png$")
_OUTPUT = re.compile(r"^/outputs/([0-9a-f]{16})/([\w./-]+)$")


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
  timeout = TIMEOUT_SECONDS

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
    path, _, query = self.path.partition("?")
    cookie = None
    try:
      cookie = self._check_access(urllib.parse.parse_qs(query).get("token", [None])[0])
      status, content_type, body = route(path)
    except HttpError as error:
      status, content_type, body = error.status, "application/json", _json_error(error)
    except service.Busy as error:
      status, content_type, body = (http.HTTPStatus.SERVICE_UNAVAILABLE, "application/json",
                                    _json_error(error))
    except service.TooLarge as error:
      status, content_type, body = (http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                    "application/json", _json_error(error))
    except (ValueError, FileNotFoundError) as error:
      status, content_type, body = (http.HTTPStatus.BAD_REQUEST, "application/json",
                                    _json_error(error))
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("The demo failed on %s %s", self.command, path)
      status, content_type, body = (http.HTTPStatus.INTERNAL_SERVER_ERROR, "application/json",
                                    _json_error(f"{type(error).__name__}: {error}"))
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    if cookie:
      self.send_header("Set-Cookie", f"{_TOKEN_COOKIE}={cookie}; HttpOnly; SameSite=Strict; "
                                     "Path=/")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _check_access(self, query_token: str | None) -> str | None:
    """Refuses (HttpError) a request without the server's token, from another site's page,
    or, served on loopback, with a Host that is not a loopback name. Returns the token to set
    as a cookie when it came in the query."""
    host = self.headers.get("Host", "")
    if self.server.loopback and _host_name(host) not in LOOPBACK_NAMES:
      raise HttpError(http.HTTPStatus.FORBIDDEN, f"this demo answers only to loopback "
                                                 f"addresses, not Host {host[:80]!r}")
    origin = self.headers.get("Origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != host:
      raise HttpError(http.HTTPStatus.FORBIDDEN, "requests from another site's page are "
                                                 "refused")
    token = self.server.token
    if not token:
      return None
    cookies = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
    given = cookies[_TOKEN_COOKIE].value if _TOKEN_COOKIE in cookies else query_token
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
      raise HttpError(http.HTTPStatus.UNAUTHORIZED, "this demo needs its token: open the URL "
                                                    "it printed (?token=...)")
    return query_token

  def _get(self, path: str) -> tuple[int, str, bytes]:
    if path in ("/", "/index.html"):
      return http.HTTPStatus.OK, "text/html; charset=utf-8", page()
    if path == "/api/info":
      return http.HTTPStatus.OK, "application/json", _json(self.demo.info())
    if match := _HELDOUT.match(path):
      try:
        which = int(match[2]) if match[2].isdigit() else match[2]
        frame = self.demo.heldout_frame(int(match[1]), which)
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
    content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
      raise HttpError(http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                      f"the request must be application/json, not {content_type[:60]!r}")
    try:
      length = int(self.headers.get("Content-Length") or 0)
    except ValueError as error:
      raise ValueError("Content-Length is not a number") from error
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


def _host_name(host: str) -> str:
  """The name of a Host header, without its port."""
  if host.startswith("["):
    return host[:host.find("]") + 1]
  return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class DemoServer(http.server.ThreadingHTTPServer):
  """A threading HTTP server holding the `Demo` its handlers use, serving at most
  `max_connections` connections at once (more are answered 503 and closed)."""
  daemon_threads = True

  def __init__(self, demo: service.Demo, host: str = "127.0.0.1", port: int = 7860, *,
               token: str = "", max_connections: int = MAX_CONNECTIONS):
    self.demo, self.token = demo, token
    self.loopback = host in LOOPBACK_NAMES
    self._connections = threading.BoundedSemaphore(max_connections)
    super().__init__((host, port), Handler)

  def process_request(self, request, client_address) -> None:
    if not self._connections.acquire(blocking=False):
      try:
        request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json"
                        b"\r\nConnection: close\r\n\r\n"
                        b'{"error": "too many connections; try again later"}')
      except OSError:
        pass
      self.shutdown_request(request)
      return
    super().process_request(request, client_address)

  def process_request_thread(self, request, client_address) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._connections.release()

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    query = f"?token={self.token}" if self.token else ""
    return f"http://{host}:{port}/{query}"
