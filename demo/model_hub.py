"""A local stand-in for Hugging Face and GitHub raw files, with their URL shapes and headers.

The tests and `scripts/develop` point rkllm's downloader at it with `RKLLM_FETCH_MIRRORS`
(`https://huggingface.co=<base>/hf,https://raw.githubusercontent.com=<base>/gh`), so no real model is downloaded.

Routes under `http://127.0.0.1:<port>`:
- `/hf/<org>/<repo>/resolve/<rev>/<file>`: 302 to `/cdn/<sha256>/<file>` with `X-Linked-Size`, `X-Linked-Etag`
  (the SHA-256, quoted) and `ETag`, as huggingface.co answers for an LFS file;
- `/hf/<org>/<repo>/blob/<rev>/<file>`: a small HTML page (the "source page" a catalogue entry cites);
- `/cdn/<sha256>/<file>`: the bytes, with `Range` support (206 + `Content-Range`);
- `/gh/<owner>/<repo>/<ref>/<path>`: the bytes as raw.githubusercontent.com serves them (200, `ETag`, `Range`).

Faults for tests: `drop_after[file] = n` (the next transfer of that file stops after n bytes, once), `missing`
(paths that answer 404), `published_sha256[file]` (what the redirect claims instead of the real hash) and
`bytes_per_s` (throttle, so a progress bar is visible and a cancel lands mid-transfer).

Run it for the develop demo: `python demo/model_hub.py --port 8931 --model FILE --catalog OUT.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SEND_CHUNK = 16 * 1024


@dataclass
class HostedFile:
    """One file the hub serves."""

    name: str
    data: bytes
    sha256: str = ""

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()


@dataclass
class ModelHub:
    """A threaded HTTP server on 127.0.0.1 serving `HostedFile`s under Hugging Face and GitHub URL shapes."""

    port: int = 0
    bytes_per_s: float | None = None
    drop_after: dict[str, int] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    published_sha256: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    _hf: dict[str, HostedFile] = field(default_factory=dict)  # "org/repo/rev/file" → file
    _gh: dict[str, HostedFile] = field(default_factory=dict)  # "owner/repo/ref/path" → file
    _by_sha: dict[str, HostedFile] = field(default_factory=dict)
    _server: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def mirrors(self) -> str:
        """The RKLLM_FETCH_MIRRORS value that sends rkllm's downloads here."""
        return f"https://huggingface.co={self.base}/hf,https://raw.githubusercontent.com={self.base}/gh"

    def add_hf(self, repo: str, rev: str, name: str, data: bytes) -> HostedFile:
        """Host a file at `https://huggingface.co/<repo>/resolve/<rev>/<name>`."""
        hosted = HostedFile(name, data)
        self._hf[f"{repo}/{rev}/{name}"] = hosted
        self._by_sha[hosted.sha256] = hosted
        return hosted

    def add_github(self, repo: str, ref: str, path: str, data: bytes) -> HostedFile:
        """Host a file at `https://raw.githubusercontent.com/<repo>/<ref>/<path>`."""
        hosted = HostedFile(path.rsplit("/", 1)[-1], data)
        self._gh[f"{repo}/{ref}/{path}"] = hosted
        return hosted

    def hf_url(self, repo: str, rev: str, name: str) -> str:
        """The real-site URL of a hosted Hugging Face file (what a catalogue entry names)."""
        return f"https://huggingface.co/{repo}/resolve/{rev}/{name}"

    def start(self) -> ModelHub:
        """Listen on 127.0.0.1 (the port given, or a free one) and serve in a thread."""
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = False  # close() joins every handler: no thread outlives the hub
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; in-flight transfers end at their next chunk; every thread is joined."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ModelHub:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def take_drop(self, name: str) -> int | None:
        """The byte count after which this transfer of `name` breaks (once), or None."""
        with self._lock:
            return self.drop_after.pop(name, None)


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: ModelHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `ModelHub.requests` instead."""

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.owner.requests.append((path, self.headers.get("Range")))
        if path in self.owner.missing:
            self._plain(404, "Entry not found")
            return
        parts = path.strip("/").split("/")
        if len(parts) >= 6 and parts[0] == "hf" and parts[3] in ("resolve", "blob"):
            key = "/".join([parts[1], parts[2], parts[4], *parts[5:]])
            hosted = self.owner._hf.get(key)
            if hosted is None:
                self._plain(404, "Entry not found")
            elif parts[3] == "blob":
                self._page(hosted, "/".join(parts[1:3]))
            else:
                self._redirect(hosted)
            return
        if len(parts) >= 3 and parts[0] == "cdn":
            hosted = self.owner._by_sha.get(parts[1])
            if hosted is None:
                self._plain(404, "Not found")
            else:
                self._send(hosted, head=head)
            return
        if len(parts) >= 5 and parts[0] == "gh":
            hosted = self.owner._gh.get("/".join(parts[1:]))
            if hosted is None:
                self._plain(404, "404: Not Found")
            else:
                self._send(hosted, head=head)
            return
        self._plain(404, "Not found")

    def _plain(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _page(self, hosted: HostedFile, repo: str) -> None:
        body = (
            f"<html><body><h1>{repo} / {hosted.name}</h1><p>Served by demo/model_hub.py (a local stand-in for "
            f"Hugging Face).</p><ul><li>SHA256: {hosted.sha256}</li><li>Size: {len(hosted.data)} bytes</li>"
            "</ul></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, hosted: HostedFile) -> None:
        published = self.owner.published_sha256.get(hosted.name, hosted.sha256)
        self.send_response(302)
        self.send_header("Location", f"{self.owner.base}/cdn/{hosted.sha256}/{hosted.name}")
        self.send_header("X-Linked-Size", str(len(hosted.data)))
        self.send_header("X-Linked-Etag", f'"{published}"')
        self.send_header("ETag", f'"{published}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, hosted: HostedFile, *, head: bool) -> None:
        data = hosted.data
        start = 0
        status = 200
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes=") : -1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hosted.sha256}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        drop = self.owner.take_drop(hosted.name)
        end = len(data) if drop is None else min(len(data), start + drop)
        position = start
        try:
            while position < end and not self.owner._stop.is_set():
                chunk = data[position : min(end, position + SEND_CHUNK)]
                self.wfile.write(chunk)
                self.wfile.flush()
                position += len(chunk)
                if self.owner.bytes_per_s:
                    time.sleep(len(chunk) / self.owner.bytes_per_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if position < len(data):
            self.close_connection = True  # a broken transfer: the client sees the connection end early


def demo_model_bytes(model: Path, size: int) -> bytes:
    """The emulator model padded with comment lines to `size` bytes (the emulator reads up to 1 MiB)."""
    text = model.read_bytes()
    line = b"# padding so the download takes a moment (demo/model_hub.py)\n"
    missing = max(0, size - len(text))
    return text + line * (missing // len(line)) + b"#" * (missing % len(line))


def demo_catalog(hub: ModelHub, hosted: HostedFile, repo: str, rev: str) -> dict[str, Any]:
    """A catalogue (rkllm_native/catalog.json format) naming the hosted demo model by its real-site URL."""
    return {
        "format": 1,
        "about": "The develop demo's model, served by demo/model_hub.py (RKLLM_FETCH_CATALOG / RKLLM_FETCH_MIRRORS).",
        "runtimes": [],
        "models": [
            {
                "id": "demo-emulated-qwen2.5-1.5b-assist",
                "name": "Demo: emulated Qwen2.5 1.5B Assist (local stand-in server)",
                "file": hosted.name,
                "url": hub.hf_url(repo, rev, hosted.name),
                "page": f"{hub.base}/hf/{repo}/blob/{rev}/{hosted.name}",
                "sha256": hosted.sha256,
                "size_bytes": len(hosted.data),
                "socs": ["rk3588"],
                "toolkit_version": "1.2.1",
                "runtime_min": "1.2.1",
                "runtime_max": "1.3.0",
                "quantization": "emulated",
                "context_length": 4096,
                "license": "the emulator's demo model (this repository)",
                "assist_tools": True,
            }
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Serve the emulator's demo model as a Hugging Face file and write a catalogue naming it; runs until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--model", type=Path, required=True, help="emulator model file to serve")
    parser.add_argument("--catalog", type=Path, required=True, help="where to write the demo catalogue")
    parser.add_argument("--size", type=int, default=900_000, help="padded size in bytes (at most 1 MiB)")
    parser.add_argument("--bytes-per-s", type=float, default=60_000, help="throttle (0: unlimited)")
    args = parser.parse_args(argv)
    repo, rev, name = "rkllm-demo/emulated-models", "main", "qwen2.5-1.5b-assist-emulated-rk3588.rkllm"
    hub = ModelHub(port=args.port, bytes_per_s=args.bytes_per_s or None)
    hosted = hub.add_hf(repo, rev, name, demo_model_bytes(args.model, args.size))
    hub.start()
    args.catalog.parent.mkdir(parents=True, exist_ok=True)
    args.catalog.write_text(json.dumps(demo_catalog(hub, hosted, repo, rev), indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(f"model hub: {hub.base} (RKLLM_FETCH_MIRRORS={hub.mirrors})\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
