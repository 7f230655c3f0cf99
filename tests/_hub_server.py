"""A stand-in for the Hugging Face hub on 127.0.0.1, for tests of the download path.

It answers the URLs huggingface_hub asks for, ``/{repo}/resolve/{revision}/{file}``, with
what it reads there: HEAD and GET, ``ETag``, ``X-Repo-Commit`` and ``Content-Length``
(a GET also honours a ``Range: bytes=N-``, as a resumed download asks). A ``.bin`` is
answered as the real hub answers an LFS file: a 302 to a "CDN" URL (here, on the same
server) with ``X-Linked-Etag`` and ``X-Linked-Size``. ``mode`` makes it
misbehave: ``"500"`` or ``"404"`` answer every file request with that status, ``"stall"``
answers the root (the reachability probe) but never answers a file request.

The server runs in a daemon thread and shuts itself down after ``lifetime`` seconds, so a
test that hangs cannot leave it behind; ``stop()`` ends it sooner.
"""

import hashlib
import http.server
import re
import threading
import time
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the revision "main" resolves to


class HubServer:
    """Serve ``files`` (repo id -> {file name -> path}) as the hub serves a repo's main."""

    def __init__(self, files, mode="ok", lifetime=300):
        self.files = {repo: {n: Path(p) for n, p in names.items()}
                      for repo, names in files.items()}  # fmt: skip
        self.mode = mode
        self.requests = []  # (method, path) of every request, in order
        self.etags = {}  # path -> sha1 of its contents, computed once
        self._release = threading.Event()  # wakes the stalled handlers at stop()
        handler = _handler(self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._timer.cancel()
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def etag(self, path):
        if path not in self.etags:
            digest = hashlib.sha1()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            self.etags[path] = digest.hexdigest()
        return self.etags[path]


def _handler(server):
    pattern = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<name>[^?]+)")
    cdn = re.compile(r"/cdn/x/resolve/main/(?P<repo>[^/]+/[^/]+)/(?P<name>[^?]+)")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: pytest shows what the test asserts
            pass

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def answer(self, body):
            server.requests.append((self.command, self.path))
            match = cdn.fullmatch(self.path)
            if match is not None:  # the "CDN": serves the file itself, no redirect
                path = server.files.get(match["repo"], {}).get(match["name"])
                return self.send_file(path, body) if path else self.status(404)
            match = pattern.fullmatch(self.path)
            if match is None:  # the root, as the reachability probe asks for it
                return self.status(404 if self.path != "/" else 200)
            if server.mode == "stall":
                server._release.wait(60)  # never answer (until the server stops)
                return
            if server.mode in ("500", "404"):
                return self.status(int(server.mode), {"X-Error-Code": "EntryNotFound"}
                                   if server.mode == "404" else {})
            path = server.files.get(match["repo"], {}).get(match["name"])
            if match["revision"] not in ("main", COMMIT):
                return self.status(404, {"X-Error-Code": "RevisionNotFound"})
            if path is None:
                return self.status(404, {"X-Error-Code": "EntryNotFound"})
            if path.suffix == ".bin":  # an LFS file: off to the "CDN"
                return self.status(302, {
                    "Location": f"{server.url}/cdn/x/resolve/main/{match['repo']}/{match['name']}",
                    "X-Linked-Etag": f'"{server.etag(path)}"',
                    "X-Linked-Size": str(path.stat().st_size),
                    "X-Repo-Commit": COMMIT,
                    "ETag": '"pointer-file-etag"',
                })  # fmt: skip
            self.send_file(path, body)

        def send_file(self, path, body):
            size = path.stat().st_size
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if body and ranged:
                start = min(int(ranged[1]), size)
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{server.etag(path)}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                with open(path, "rb") as f:
                    f.seek(start)
                    for block in iter(lambda: f.read(1 << 20), b""):
                        self.wfile.write(block)

        def status(self, code, headers=None):
            text = f"{code} (test hub)\n".encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(text)

    return Handler


def wait_until(condition, timeout=5.0):
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < end:
        time.sleep(0.05)
    return value
