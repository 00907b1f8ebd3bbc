"""A loopback stand-in for the Hugging Face Hub's file API (what `snapshot_download` calls),
set as HF_ENDPOINT: repository info at a revision (and the file tree, which newer
huggingface_hub lists), then HEAD and GET of each file under
`/{repo}/resolve/{revision}/{path}`. Errors carry the Hub's X-Error-Code header, which
huggingface_hub turns into its exceptions (gated, not found, no such revision)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_INFO = re.compile(r"^/api/models/(?P<repo>.+?)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>.+?)/tree/(?P<rev>[^/]+)$")  # huggingface_hub 1.x+
_FILE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class FakeHub:
    """Serves `repos` (repo id -> directory whose files it holds) at one commit, revision
    "main" (or the commit itself); `gated` repos answer 401 GatedRepo to everyone."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()) -> None:
        self.repos, self.gated = repos, gated
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _error(self, handler, status: int, code: str, message: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _answer(self, handler, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        match = _INFO.match(path) or _TREE.match(path) or _FILE.match(path)
        if match is None or match["repo"] not in self.repos:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        if match["repo"] in self.gated:
            return self._error(handler, 401, "GatedRepo", "Access to this repo is restricted")
        if match["rev"] not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        files = self._files(match["repo"])
        if match.re is _TREE:  # the file listing, one page
            tree = [{"type": "file", "path": name, "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                    for name, p in files.items()]  # fmt: skip
            return self._send(handler, json.dumps(tree).encode(), body, {})
        if match.re is _INFO:
            siblings = [{"rfilename": name} for name in files]
            data = json.dumps({"id": match["repo"], "sha": COMMIT, "siblings": siblings})
            return self._send(handler, data.encode(), body, {"Content-Type": "application/json"})
        if match["path"] not in files:
            return self._error(handler, 404, "EntryNotFound", "Entry not found")
        content = files[match["path"]].read_bytes()
        etag = hashlib.sha256(content).hexdigest()
        self._send(handler, content, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})

    @staticmethod
    def _send(handler, content: bytes, body: bool, headers: dict) -> None:
        handler.send_response(200)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if body:
            handler.wfile.write(content)
