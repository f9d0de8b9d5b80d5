"""A local GCS JSON API for tests: gcp-storage-emulator, with generation preconditions and faults.

gcp-storage-emulator serves the real GCS JSON API on 127.0.0.1, but it ignores `ifGenerationMatch`
and never fails. This wrapper, run in its own process (`python -m tests.gcs_emulator --port=P`),
adds what the tests need:

- preconditions: an upload or a delete with `ifGenerationMatch=N` answers 412 unless the object's
  generation is N (0: the object must not exist), as GCS does. The emulator serves one request at
  a time, so the check and the write are atomic.
- downloads carry the object's generation (`x-goog-generation`, which tensorstore needs) and
  honour `ifGenerationMatch` / `ifGenerationNotMatch`.
- faults: `GET /_faults?pattern=REGEX&status=403&skip=K` makes every write (upload, delete, copy,
  compose) of an object whose name matches REGEX fail with `status`, after the first K matching
  writes succeed; `GET /_faults` with no pattern clears the rule. `GET /_writes` returns the names
  written so far (JSON list), `GET /_healthz` answers ok.

Clients find it through STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs, etils.epath) and
TENSORSTORE_GCS_HTTP_URL (tensorstore, i.e. Orbax's array data); `client_env(url)` gives both, plus
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (newer gcsfs otherwise probes the bucket over gRPC, which
the emulator does not serve: 60 s time-outs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """The environment variables that point every GCS client of this project at `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test-project"}


# -- the server side (runs in the emulator's own process) -----------------------------------------
_RULE: dict = {}
_WRITES: list[str] = []


def _object_name(request, storage) -> str | None:
  params = request.params or {}
  if "object_id" in params:
    return params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  if "upload_id" in request.query:
    try:
      return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
    except Exception:  # pylint: disable=broad-except
      return None
  data = request.data
  if isinstance(data, dict):
    return (data.get("meta") or data).get("name")
  return None


def _error(response, status: int, message: str, reason: str) -> None:
  response.status = HTTPStatus(status)
  response.json({"error": {"code": status, "message": message,
                           "errors": [{"reason": reason, "domain": "global"}]}})


def _wrap(handler, is_write: bool, kind: str | None, not_found):
  def wrapped(request, response, storage, *args, **kwargs):
    if is_write and request.method in ("POST", "PUT", "DELETE", "PATCH"):
      name = _object_name(request, storage) or ""
      pattern = _RULE.get("pattern")
      if pattern and re.search(pattern, name):
        _RULE["seen"] = _RULE.get("seen", 0) + 1
        if _RULE["seen"] > _RULE.get("skip", 0):
          _ = request.data  # read the body so the connection stays usable
          _error(response, _RULE.get("status", 503), f"injected fault writing {name}",
                 "backendError")
          return None
      want = request.query.get("ifGenerationMatch")
      starts_upload = kind == "insert" and "upload_id" not in request.query
      if want is not None and (starts_upload or kind == "delete"):
        try:
          current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except not_found:
          current = "0"
        if current != str(want[0]):
          _ = request.data
          _error(response, 412, "At least one of the pre-conditions you specified did not hold.",
                 "conditionNotMet")
          return None
      _WRITES.append(name)
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _wrap_download(handler, not_found):
  """Media downloads as GCS answers them: the generation in `x-goog-generation` (tensorstore reads
  it; without it: 'Malformed StorageGeneration'), and read preconditions honoured."""
  def wrapped(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except not_found:
      return handler(request, response, storage, *args, **kwargs)
    gen = str(obj["generation"])
    response["x-goog-generation"] = gen
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    if request.query.get("ifGenerationNotMatch", [None])[0] == gen:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    want = request.query.get("ifGenerationMatch", [None])[0]
    if want is not None and want != gen:
      _error(response, 412, "At least one of the pre-conditions you specified did not hold.",
             "conditionNotMet")
      return None
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _control(request, response, storage):  # pylint: disable=unused-argument
  if request.path == "/_faults":
    _RULE.clear()
    if request.query.get("pattern"):
      _RULE.update(pattern=request.query["pattern"][0],
                   status=int(request.query.get("status", ["503"])[0]),
                   skip=int(request.query.get("skip", ["0"])[0]))
    response.json(dict(_RULE))
  elif request.path == "/_writes":
    response.json(list(_WRITES))
  else:
    response.json({"ok": True})


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server as srv  # pylint: disable=g-import-not-at-top
  log = os.environ.get("GCS_EMULATOR_LOG")
  if log:  # debugging: one line per request
    orig_close = srv.Response.close

    def close(self):
      with open(log, "a", encoding="utf-8") as f:
        f.write(f"{self._handler.command} {self._handler.path} -> {self.status.value} "
                f"{dict(self._headers)}\n")
      return orig_close(self)
    srv.Response.close = close
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  writes = {objects.insert, objects.upload_partial, objects.delete, objects.copy,
            objects.rewrite, objects.compose, objects.patch, objects.xml_upload}
  kinds = {objects.insert: "insert", objects.delete: "delete"}
  table = []
  for rx, handlers in srv.HANDLERS:
    if isinstance(handlers, dict):
      handlers = {m: (_wrap_download(h, NotFound) if h in (objects.download, objects.get) else
                      _wrap(h, h in writes, kinds.get(h), NotFound)) for m, h in handlers.items()}
    table.append((rx, handlers))
  control = {"GET": _control}
  srv.HANDLERS = ((r"^/_faults$", control), (r"^/_writes$", control), (r"^/_healthz$", control),
                  *table)
  # Uploads posted to .../o without /upload go through objects.insert directly.
  objects.insert = _wrap(objects.insert, True, "insert", NotFound)
  server = srv.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.run()


# -- the test side --------------------------------------------------------------------------------
class Emulator:
  """The emulator in a subprocess; `url`, `env`, `set_fault(...)`, `clear_fault()`, `stop()`."""

  def __init__(self, bucket: str = "bucket", port: int | None = None):
    self.bucket = bucket
    self.port = port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = client_env(self.url)
    self._proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator", f"--port={self.port}", f"--bucket={bucket}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
      try:
        self._get("/_healthz")
        break
      except OSError:
        if self._proc.poll() is not None or time.time() > deadline:
          raise RuntimeError("the GCS emulator did not start") from None
        time.sleep(0.1)

  def _get(self, path: str):
    with urllib.request.urlopen(self.url + path, timeout=10) as r:
      return json.loads(r.read() or b"null")

  def set_fault(self, pattern: str, status: int = 503, skip: int = 0) -> None:
    from urllib.parse import urlencode  # pylint: disable=g-import-not-at-top
    self._get("/_faults?" + urlencode(dict(pattern=pattern, status=status, skip=skip)))

  def clear_fault(self) -> None:
    self._get("/_faults")

  def writes(self) -> list[str]:
    return self._get("/_writes")

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", default="bucket")
  args = parser.parse_args()
  serve(args.port, args.bucket)
