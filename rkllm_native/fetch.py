"""Download a runtime library and a compatible model, verified, resumable and cancellable (stdlib only).

One downloader serves both the Home Assistant config flow (run in an executor with a progress callback and a
cancel event) and the board-side command:

    python -m rkllm_native.fetch --list
    python -m rkllm_native.fetch --model ID --dir DIR [--runtime VERSION | --no-runtime]
    python -m rkllm_native.fetch --runtime VERSION --dir DIR
    python -m rkllm_native.fetch --url URL [--sha256 HEX] --dir DIR

What a download guarantees (docs/fetch.md):
- the free space is checked before the first byte (the size the site publishes, less what is already there);
- bytes go to `<name>.part`, which is fsynced, verified (the site's size and SHA-256 for models, the git-blob SHA-1
  of the official binaries for runtimes, docs/runtime.md §5.2) and only then renamed over `<name>`;
- a dropped connection resumes with an HTTP Range request (a few retries, then a network error);
- a cancel stops between chunks and removes the partial file;
- every failure is a `FetchError` whose `code` says what went wrong and whose message names the file and what to do.

Hugging Face answers `resolve/<rev>/<file>` with a redirect to its CDN that carries `X-Linked-Size` and
`X-Linked-Etag` (the file's SHA-256); those are compared with the catalogue before anything is downloaded, so a file
that changed upstream is refused at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import http.client
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Final, Literal

from . import soc as soc_detect
from .catalog import (
    Catalog,
    CatalogError,
    ModelEntry,
    RuntimeRelease,
    SizeRange,
    apply_mirrors,
    load_catalog,
    machine_variant,
    mirrors_from_env,
    offered_models,
    parse_mirrors,
)

CHUNK_SIZE: Final = 1 << 20
DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_RETRIES: Final = 5
RETRY_DELAYS_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
# Kept free after a download: a full disk breaks Home Assistant's own database long before the model matters.
FREE_SPACE_RESERVE_BYTES: Final = 64 * 1024 * 1024
PART_SUFFIX: Final = ".part"
USER_AGENT: Final = "rkllm-fetch/1"
RUNTIME_FILE_NAME: Final = "librkllmrt.so"

FetchErrorCode = Literal[
    "network",
    "not_found",
    "http_error",
    "checksum_mismatch",
    "size_mismatch",
    "disk_full",
    "incompatible_soc",
    "incompatible_runtime",
    "no_runtime_build",
    "cancelled",
    "bad_request",
]
Phase = Literal["download", "verify"]


class FetchError(Exception):
    """A download that cannot complete; `code` for the caller's translation, the message for people."""

    def __init__(self, code: FetchErrorCode, message: str, *, file: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.code: FetchErrorCode = code
        self.message = message
        self.file = file
        self.url = url


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one file is: bytes done of `total` (None while the size is unknown)."""

    file: str
    done: int
    total: int | None
    phase: Phase = "download"

    @property
    def fraction(self) -> float | None:
        """0..1, or None without a total."""
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A verified file in place."""

    path: Path
    size: int
    sha256: str
    reused: bool = False  # the file was already there and verified; nothing was downloaded


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """Tuning of one download: network timeout, retries after a broken connection, what a cancel leaves."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S
    keep_partial_on_cancel: bool = False  # the command keeps it so the next run resumes; the config flow does not


@dataclass(frozen=True, slots=True)
class _Published:
    """What the server said about the file before sending it."""

    total: int | None
    sha256: str | None
    restart: bool  # the server ignored our Range and sends the whole file


def free_bytes(directory: Path) -> int:
    """Free space for an unprivileged writer on the filesystem of `directory` (tests replace this)."""
    return shutil.disk_usage(directory).free


def write_chunk(stream: IO[bytes], data: bytes) -> None:
    """Write one chunk (one place where ENOSPC can arise; tests inject it here)."""
    stream.write(data)


def _human(size: int | None) -> str:
    if size is None:
        return "unknown size"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{size} B"  # pragma: no cover - the loop always returns


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, keeping each redirect's headers (Hugging Face's X-Linked-* are there)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Message] = []

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _header(messages: Sequence[Message], name: str) -> str | None:
    for message in messages:
        value = message.get(name)
        if value:
            return str(value).strip()
    return None


def _published_sha256(messages: Sequence[Message]) -> str | None:
    """Hugging Face's `X-Linked-Etag` (quoted, maybe weak) when it is a SHA-256."""
    value = _header(messages, "X-Linked-Etag")
    if value is None:
        return None
    value = value.removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


_CONTENT_RANGE: Final = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _published(response: http.client.HTTPResponse, redirects: Sequence[Message], offset: int) -> _Published:
    """Total size and SHA-256 the server published, and whether it answered our Range request."""
    messages = [*redirects, response.headers]
    linked = _header(messages, "X-Linked-Size")
    total: int | None = int(linked) if linked and linked.isdigit() else None
    restart = offset > 0 and response.status != http.HTTPStatus.PARTIAL_CONTENT
    content_range = response.headers.get("Content-Range")
    if response.status == http.HTTPStatus.PARTIAL_CONTENT and content_range:
        match = _CONTENT_RANGE.match(content_range)
        if match is not None:
            restart = int(match.group(1)) != offset
            if total is None and match.group(3) != "*":
                total = int(match.group(3))
    length = response.headers.get("Content-Length")
    if total is None and length and length.isdigit():
        total = int(length) + (0 if restart or offset == 0 else offset)
    return _Published(total=total, sha256=_published_sha256(messages), restart=restart)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _hash_file(path: Path, digest: hashlib._Hash, progress: ProgressCallback | None, total: int | None) -> int:
    """Feed the file into `digest`; returns its length. Reports `verify` progress."""
    done = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(Progress(path.name, done, total, "verify"))
    return done


def git_blob_sha1_of_file(path: Path) -> str:
    """The git-blob SHA-1 of a file, streamed (detect.git_blob_sha1 for files of any size)."""
    digest = hashlib.sha1(b"blob %d\x00" % path.stat().st_size, usedforsecurity=False)
    _hash_file(path, digest, None, None)
    return digest.hexdigest()


def _is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: Path, needed: int | None, free: int | None) -> FetchError:
    detail = "" if needed is None else f" ({_human(needed)} needed, {_human(free)} free)"
    return FetchError(
        "disk_full",
        f"not enough disk space for {path}{detail}: free space on that disk or choose another folder",
        file=str(path),
    )


def _verify(
    path: Path,
    final: Path,
    size: int,
    sha256: str,
    *,
    expected_size: SizeRange | None,
    expected_sha256: str | None,
    expected_blob_sha1: str | None,
) -> None:
    """Compare the finished file with what the site (or the official-binary table) publishes."""
    if expected_size is not None and size not in expected_size:
        raise FetchError(
            "size_mismatch",
            f"{final.name} is {size} bytes but its source publishes {expected_size.text}: the download is incomplete "
            "or the file changed upstream; try again, and if it repeats the catalogue entry is out of date",
            file=str(final),
        )
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise FetchError(
            "checksum_mismatch",
            f"{final.name} has SHA-256 {sha256} but its source publishes {expected_sha256}: the download was "
            "corrupted or the file changed upstream; the file was removed, try again",
            file=str(final),
        )
    if expected_blob_sha1 is not None and (blob := git_blob_sha1_of_file(path)) != expected_blob_sha1:
        raise FetchError(
            "checksum_mismatch",
            f"{final.name} (git-blob SHA-1 {blob}) is not the official build (expected {expected_blob_sha1}): the "
            "file was removed; try again, and install the runtime from airockchip/rknn-llm by hand if it repeats",
            file=str(final),
        )


def _reuse_existing(
    final: Path,
    *,
    expected_size: SizeRange | None,
    expected_sha256: str | None,
    expected_blob_sha1: str | None,
    progress: ProgressCallback | None,
) -> Downloaded | None:
    """A file already in place that passes verification is kept (a repeated fetch costs a hash, not a download)."""
    if not final.is_file() or (expected_sha256 is None and expected_blob_sha1 is None):
        return None
    size = final.stat().st_size
    if expected_size is not None and size not in expected_size:
        return None
    digest = hashlib.sha256()
    _hash_file(final, digest, progress, size)
    try:
        _verify(
            final,
            final,
            size,
            digest.hexdigest(),
            expected_size=expected_size,
            expected_sha256=expected_sha256,
            expected_blob_sha1=expected_blob_sha1,
        )
    except FetchError:
        return None
    return Downloaded(final, size, digest.hexdigest(), reused=True)


def _open(url: str, offset: int, timeout_s: float) -> tuple[http.client.HTTPResponse, list[Message]]:
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise FetchError("bad_request", f"{url}: only http(s) URLs can be downloaded", url=url)
    recorder = _RedirectRecorder()
    opener = urllib.request.build_opener(recorder)
    # The scheme is checked above: no file:// or custom scheme reaches urlopen.
    request = urllib.request.Request(  # noqa: S310
        url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    if offset > 0:
        request.add_header("Range", f"bytes={offset}-")
    response = opener.open(request, timeout=timeout_s)
    if not isinstance(response, http.client.HTTPResponse):  # pragma: no cover - file:// or ftp:// URLs
        response.close()
        raise FetchError("bad_request", f"{url}: only http(s) URLs can be downloaded", url=url)
    return response, recorder.headers


def download(  # noqa: PLR0912, PLR0915 - one loop that owns the part file's whole life
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: SizeRange | None = None,
    blob_sha1: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mirrors: Mapping[str, str] | None = None,
    options: DownloadOptions | None = None,
) -> Downloaded:
    """Download `url` to `dest` (see the module docstring for the guarantees); blocking, run it in a thread."""
    opts = options or DownloadOptions()
    timeout_s, retries, retry_delays_s = opts.timeout_s, opts.retries, opts.retry_delays_s
    keep_partial_on_cancel = opts.keep_partial_on_cancel
    final = Path(dest)
    name = final.name
    source = apply_mirrors(url, mirrors if mirrors is not None else mirrors_from_env())
    expected_sha256 = sha256.lower() if sha256 else None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if _is_disk_full(err):
            raise _disk_full(final, None, None) from err
        raise FetchError("bad_request", f"cannot create the folder {final.parent}: {err.strerror or err}") from err
    reused = _reuse_existing(
        final, expected_size=size, expected_sha256=expected_sha256, expected_blob_sha1=blob_sha1, progress=progress
    )
    if reused is not None:
        return reused

    part = final.with_name(name + PART_SUFFIX)
    digest = hashlib.sha256()
    offset = 0
    if part.is_file():  # a previous run's partial file: continue it
        offset = _hash_file(part, digest, None, None)
    total: int | None = None
    failures = 0
    checked = False
    finished = False
    try:
        while True:
            _check_cancel(cancel, final)
            try:
                response, redirects = _open(source, offset, timeout_s)
            except urllib.error.HTTPError as err:
                err.close()
                if err.code == http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and offset > 0:
                    # Our partial file is as long as (or longer than) the file: verify what we have, or restart.
                    if total is not None and offset == total:
                        break
                    part.unlink(missing_ok=True)
                    digest, offset = hashlib.sha256(), 0
                    continue
                if err.code in (http.HTTPStatus.NOT_FOUND, http.HTTPStatus.GONE):
                    raise FetchError(
                        "not_found",
                        f"{source} answered {err.code} {err.reason}: {name} is no longer there; the catalogue entry or "
                        "URL is out of date (update rkllm, or give the file's current URL)",
                        file=name,
                        url=source,
                    ) from err
                if err.code >= http.HTTPStatus.INTERNAL_SERVER_ERROR and failures < retries:
                    failures += 1
                    _wait(cancel, retry_delays_s, failures)
                    continue
                raise FetchError(
                    "http_error",
                    f"{source} answered {err.code} {err.reason} for {name}: try again later, or check the URL",
                    file=name,
                    url=source,
                ) from err
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                failures += 1
                if failures > retries:
                    reason = err.reason if isinstance(err, urllib.error.URLError) else err
                    raise FetchError(
                        "network",
                        f"cannot download {name} from {source}: {reason}; check the network connection and try again",
                        file=name,
                        url=source,
                    ) from err
                _wait(cancel, retry_delays_s, failures)
                continue
            with response:
                published = _published(response, redirects, offset)
                if published.restart:
                    part.unlink(missing_ok=True)
                    digest, offset = hashlib.sha256(), 0
                total = published.total if published.total is not None else total
                if not checked:
                    checked = True
                    _check_published(final, source, published, expected_sha256, size)
                    if total is not None:
                        _check_free_space(final, total - offset)
                if progress is not None:
                    progress(Progress(name, offset, total))
                try:
                    offset = _receive(response, part, offset, total, digest, name, progress, cancel)
                except (OSError, http.client.HTTPException) as err:
                    if isinstance(err, OSError) and _is_disk_full(err):
                        raise _disk_full(final, None if total is None else total - offset, None) from err
                    failures += 1
                    if failures > retries:
                        raise FetchError(
                            "network",
                            f"the connection for {name} broke {failures} times ({err}); check the network and try "
                            "again: the download resumes where it stopped",
                            file=name,
                            url=source,
                        ) from err
                    _wait(cancel, retry_delays_s, failures)
                    continue
            if total is not None and offset < total:
                failures += 1  # the server closed the connection early: resume with a Range request
                _retry_or_raise(
                    failures,
                    retries,
                    FetchError(
                        "network",
                        f"the connection for {name} kept closing early ({offset} of {total} bytes); check the "
                        "network and try again: the download resumes where it stopped",
                        file=name,
                        url=source,
                    ),
                    cancel,
                    retry_delays_s,
                )
                continue
            break
        with part.open("rb+") as stream:
            os.fsync(stream.fileno())
        _verify(
            part,
            final,
            offset,
            digest.hexdigest(),
            expected_size=size if size is not None else (SizeRange.exact(total) if total is not None else None),
            expected_sha256=expected_sha256,
            expected_blob_sha1=blob_sha1,
        )
        os.replace(part, final)
        _fsync_directory(final.parent)
        finished = True
        return Downloaded(final, offset, digest.hexdigest())
    except FetchError as err:
        keep = err.code in ("network", "http_error") or (err.code == "cancelled" and keep_partial_on_cancel)
        if not keep:
            part.unlink(missing_ok=True)
        raise
    except BaseException:
        # KeyboardInterrupt in the command: keep the partial file so the next run resumes it.
        if not finished and not keep_partial_on_cancel:
            part.unlink(missing_ok=True)
        raise


def _check_published(
    final: Path, source: str, published: _Published, expected_sha256: str | None, size: SizeRange | None
) -> None:
    """Refuse before downloading when the site already says the file is not the one the catalogue names."""
    if expected_sha256 is not None and published.sha256 is not None and published.sha256 != expected_sha256:
        raise FetchError(
            "checksum_mismatch",
            f"{source} now publishes SHA-256 {published.sha256} for {final.name}, not {expected_sha256}: the file "
            "changed upstream and the catalogue entry is out of date; nothing was downloaded",
            file=str(final),
            url=source,
        )
    if size is not None and published.total is not None and published.total not in size:
        raise FetchError(
            "size_mismatch",
            f"{source} publishes {published.total} bytes for {final.name}, not {size.text}: the file changed "
            "upstream and the catalogue entry is out of date; nothing was downloaded",
            file=str(final),
            url=source,
        )


def _check_cancel(cancel: threading.Event | None, final: Path) -> None:
    if cancel is not None and cancel.is_set():
        raise FetchError("cancelled", f"the download of {final.name} was cancelled", file=str(final))


def _check_free_space(final: Path, needed: int) -> None:
    """Refuse to start when the rest of the file (plus a reserve) does not fit on the disk."""
    free = free_bytes(final.parent)
    if free < needed + FREE_SPACE_RESERVE_BYTES:
        raise _disk_full(final, needed, free)


def _retry_or_raise(
    failures: int, retries: int, error: FetchError, cancel: threading.Event | None, delays: Sequence[float]
) -> None:
    """Wait before the next attempt, or give up with `error` after `retries` failures."""
    if failures > retries:
        raise error
    _wait(cancel, delays, failures)


def _wait(cancel: threading.Event | None, delays: Sequence[float], failures: int) -> None:
    delay = delays[min(failures, len(delays)) - 1] if delays else 0.0
    if cancel is not None:
        cancel.wait(delay)
    elif delay > 0:
        time.sleep(delay)


def _receive(
    response: http.client.HTTPResponse,
    part: Path,
    offset: int,
    total: int | None,
    digest: hashlib._Hash,
    name: str,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> int:
    """Append the body to the part file until it ends (or the connection does); returns the new offset."""
    with part.open("ab") as stream:
        while True:
            if cancel is not None and cancel.is_set():
                raise FetchError("cancelled", f"the download of {name} was cancelled", file=name)
            chunk = response.read1(CHUNK_SIZE)
            if not chunk:
                stream.flush()
                return offset
            write_chunk(stream, chunk)
            digest.update(chunk)
            offset += len(chunk)
            if progress is not None:
                progress(Progress(name, offset, total))


# ---------------------------------------------------------------------------
# Models and runtimes
# ---------------------------------------------------------------------------


def check_soc(entry: ModelEntry, soc: str | None) -> None:
    """Refuse a model converted for another SoC than this board's (None: unknown board, nothing to check)."""
    if soc is not None and soc.lower() not in entry.socs:
        raise FetchError(
            "incompatible_soc",
            f"{entry.file} is converted for {', '.join(s.upper() for s in entry.socs)}, but this board is "
            f"{soc.upper()}: the runtime would refuse it; pick a model converted for {soc.upper()}",
            file=entry.file,
        )


def check_runtime(entry: ModelEntry, runtime_version: str) -> None:
    """Refuse a model that runtime `runtime_version` is not known to run (toolkit newer, or outside the range)."""
    if not entry.runs_on_runtime(runtime_version):
        known = ", ".join(entry.runtimes()) or "none this rkllm release supports"
        raise FetchError(
            "incompatible_runtime",
            f"{entry.file} (rkllm-toolkit {entry.toolkit_version}) is not known to run on librkllmrt "
            f"{runtime_version}; runtimes that run it: {known}",
            file=entry.file,
        )


def fetch_model(
    entry: ModelEntry,
    directory: str | Path,
    *,
    soc: str | None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mirrors: Mapping[str, str] | None = None,
    options: DownloadOptions | None = None,
) -> Downloaded:
    """Download a catalogue model into `directory` after checking it fits this board's SoC."""
    check_soc(entry, soc)
    return download(
        entry.url,
        Path(directory) / entry.file,
        sha256=entry.sha256,
        size=entry.size,
        progress=progress,
        cancel=cancel,
        mirrors=mirrors,
        options=options,
    )


def fetch_runtime(
    release: RuntimeRelease,
    directory: str | Path,
    *,
    variant: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mirrors: Mapping[str, str] | None = None,
    expected_blob_sha1: str | None = None,
    options: DownloadOptions | None = None,
) -> Downloaded:
    """Download librkllmrt of `release` for this CPU into `<directory>/runtime/<version>/`, verified by blob SHA-1.

    `expected_blob_sha1` replaces the official table's value (tests serve a fixture library in its place).
    """
    build = variant or machine_variant()
    if build is None or build not in release.files:
        import platform

        raise FetchError(
            "no_runtime_build",
            f"airockchip/rknn-llm {release.tag} has no librkllmrt build for this CPU ({platform.machine()}): run the "
            "model on the Rockchip board itself, or on a remote worker there",
            file=RUNTIME_FILE_NAME,
        )
    blob = expected_blob_sha1 or release.blob_sha1(build)
    if blob is None:
        raise FetchError(
            "no_runtime_build",
            f"librkllmrt {release.version} ({build}) has no known official git-blob SHA-1 to verify it against; "
            "install it by hand from airockchip/rknn-llm",
            file=RUNTIME_FILE_NAME,
        )
    return download(
        release.url(build),
        runtime_path(directory, release.version),
        blob_sha1=blob,
        progress=progress,
        cancel=cancel,
        mirrors=mirrors,
        options=options,
    )


def runtime_path(directory: str | Path, version: str) -> Path:
    """Where `fetch_runtime` puts a runtime version (one folder per version, so versions can coexist)."""
    return Path(directory) / "runtime" / version / RUNTIME_FILE_NAME


def file_name_from_url(url: str) -> str:
    """The file name a custom URL downloads to (its last path segment); raises FetchError for odd URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FetchError("bad_request", f"{url!r} is not an http(s) URL", url=url)
    name = urllib.parse.unquote(parsed.path.rsplit("/", 1)[-1])
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise FetchError("bad_request", f"{url} does not end in a file name", url=url)
    return name


def fetch_url(
    url: str,
    directory: str | Path,
    *,
    sha256: str | None = None,
    soc: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    mirrors: Mapping[str, str] | None = None,
    options: DownloadOptions | None = None,
) -> Downloaded:
    """Download a model from a URL of the user's choice, optionally pinned by SHA-256.

    The site's X-Linked-Etag is checked against the pin when present. A file name naming another SoC than this
    board's is refused.
    """
    name = file_name_from_url(url)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
        raise FetchError("bad_request", f"{sha256!r} is not a SHA-256 (64 hex digits)", url=url)
    named = soc_detect.soc_in_file_name(name)
    if soc is not None and named is not None and named != soc.lower():
        raise FetchError(
            "incompatible_soc",
            f"{name} is named for {named.upper()}, but this board is {soc.upper()}: the runtime would refuse it; "
            f"use a model converted for {soc.upper()}",
            file=name,
            url=url,
        )
    return download(
        url,
        Path(directory) / name,
        sha256=sha256.strip().lower() if sha256 else None,
        progress=progress,
        cancel=cancel,
        mirrors=mirrors,
        options=options,
    )


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


class _TerminalProgress:
    """One updating line on a terminal; a line per 10 % elsewhere (logs, pipes)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last_step: dict[tuple[str, str], int] = {}
        self._started = time.monotonic()
        self._last_draw = 0.0

    def __call__(self, update: Progress) -> None:
        fraction = update.fraction
        percent = "" if fraction is None else f" {fraction * 100:5.1f} %"
        action = "verifying" if update.phase == "verify" else "downloading"
        text = f"{action} {update.file}: {_human(update.done)} of {_human(update.total)}{percent}"
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or (fraction is not None and fraction >= 1):
                self._last_draw = now
                self._stream.write("\r" + text.ljust(100)[:100])
                self._stream.flush()
            return
        step = -1 if fraction is None else int(fraction * 10)
        key = (update.file, update.phase)
        if step != self._last_step.get(key, -2) and step >= 0:
            self._last_step[key] = step
            self._stream.write(text + "\n")
            self._stream.flush()

    def end_line(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _format_entry(entry: ModelEntry, soc: str | None) -> str:
    fits = "" if soc is None or soc in entry.socs else f"  (not for this board: {soc.upper()})"
    assist = "yes" if entry.assist_tools else "no"
    socs = ", ".join(item.upper() for item in entry.socs)
    return (
        f"{entry.id}\n"
        f"    {entry.name}; {entry.size.display}; {entry.quantization}; SoC {socs}; "
        f"toolkit {entry.toolkit_version}; runtime {entry.runtime_min}-{entry.runtime_max}; "
        f"Assist with tools: {assist}{fits}\n"
        f"    licence: {entry.license}\n"
        f"    source: {entry.page}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rkllm_native.fetch",
        description="Download librkllmrt and a compatible RKLLM model, verified against their published checksums.",
        epilog="Pass the same DIR to the remote worker as --models-dir, so it may open the files fetched here.",
    )
    parser.add_argument("--list", action="store_true", help="list the catalogue (models for this board first)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", metavar="ID", help="download a catalogue model (and the runtime that runs it)")
    what.add_argument("--url", help="download a model from this URL")
    parser.add_argument("--runtime", metavar="VERSION", help="download this librkllmrt version (e.g. 1.2.3)")
    parser.add_argument("--no-runtime", action="store_true", help="with --model: download the model only")
    parser.add_argument("--dir", type=Path, help="folder to download into")
    parser.add_argument("--sha256", help="with --url: the file's expected SHA-256")
    parser.add_argument("--soc", help="the board's SoC, e.g. rk3588 (default: read from the device tree)")
    parser.add_argument(
        "--variant",
        choices=("linux-aarch64", "linux-armhf"),
        help="runtime build to fetch (default: this CPU's)",
    )
    parser.add_argument(
        "--mirror", action="append", default=[], metavar="FROM=TO", help="rewrite a base URL (tests, local mirrors)"
    )
    return parser


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the command downloads, decided (and checked) before the first byte."""

    model: ModelEntry | None
    url: str | None
    runtime: RuntimeRelease | None


def _plan(args: argparse.Namespace, catalog: Catalog, board: str | None, variant: str | None) -> _Plan:
    """Check the arguments against the catalogue, the board and this CPU; raises FetchError or ValueError."""
    entry: ModelEntry | None = None
    if args.model is not None:
        entry = catalog.model(args.model)
        if entry is None:
            raise ValueError(f"no model {args.model!r} in the catalogue (see --list)")
        check_soc(entry, board)
    release: RuntimeRelease | None = None
    if args.runtime is not None:
        release = catalog.runtime(args.runtime)
        if release is None:
            known = ", ".join(item.version for item in catalog.runtimes)
            raise ValueError(f"no runtime {args.runtime!r} in the catalogue (known: {known})")
        if entry is not None:
            check_runtime(entry, args.runtime)
    elif entry is not None and not args.no_runtime:
        release = catalog.runtime_for_model(entry, variant or "linux-aarch64")
        if release is None:
            raise FetchError(
                "incompatible_runtime",
                f"no supported librkllmrt release runs {entry.file} (rkllm-toolkit {entry.toolkit_version})",
                file=entry.file,
            )
    if release is not None and (variant is None or variant not in release.files):
        import platform

        raise FetchError(
            "no_runtime_build",
            f"airockchip/rknn-llm publishes no librkllmrt build for this CPU ({platform.machine()}): fetch on the "
            "board, pass --variant linux-aarch64 to fetch the board's build from here, or use --no-runtime",
            file=RUNTIME_FILE_NAME,
        )
    return _Plan(model=entry, url=args.url, runtime=release)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; exit status 0 on success, 1 when a download fails, 2 for bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if not (args.list or args.model or args.url or args.runtime):
        parser.error("give --list, --model ID, --url URL or --runtime VERSION")
    try:
        catalog: Catalog = load_catalog()
        mirrors = {**mirrors_from_env(), **parse_mirrors(",".join(args.mirror))}
    except CatalogError as error:
        err.write(f"rkllm fetch: error: {error}\n")
        return 2
    board = (args.soc or soc_detect.local_soc() or "").lower() or None
    if args.list:
        _print_catalog(out, catalog, board)
        return 0
    if args.dir is None:
        err.write("rkllm fetch: error: --dir is required to download\n")
        return 2
    variant = args.variant or machine_variant()
    progress = _TerminalProgress(err)
    options = DownloadOptions(keep_partial_on_cancel=True)
    fetched: list[tuple[str, Path]] = []
    try:
        plan = _plan(args, catalog, board, variant)
        if plan.model is not None:
            fetched.append(("model", fetch_model(plan.model, args.dir, soc=board, progress=progress,
                                                 mirrors=mirrors, options=options).path))  # fmt: skip
            progress.end_line()
        elif plan.url is not None:
            fetched.append(("model", fetch_url(plan.url, args.dir, sha256=args.sha256, soc=board, progress=progress,
                                               mirrors=mirrors, options=options).path))  # fmt: skip
            progress.end_line()
        if plan.runtime is not None:
            runtime = fetch_runtime(
                plan.runtime, args.dir, variant=variant, progress=progress, mirrors=mirrors, options=options
            )
            progress.end_line()
            fetched.append((f"runtime {plan.runtime.version}", runtime.path))
    except ValueError as error:
        err.write(f"rkllm fetch: error: {error}\n")
        return 2
    except FetchError as error:
        progress.end_line()
        err.write(f"rkllm fetch: error: {error.message}\n")
        return 1
    except KeyboardInterrupt:
        progress.end_line()
        err.write("rkllm fetch: interrupted; run the same command again to resume\n")
        return 130
    for label, path in fetched:
        out.write(f"{label}: {path}\n")
    out.write(f"remote worker: pass --models-dir {args.dir} so it may open these files\n")
    return 0


def _print_catalog(out: IO[str], catalog: Catalog, board: str | None) -> None:
    offered = offered_models(catalog, board)
    others = [entry for entry in catalog.models if entry not in offered]
    out.write(f"board SoC: {board.upper() if board else 'unknown (no Rockchip device tree)'}\n\n")
    for entry in [*offered, *others]:
        out.write(_format_entry(entry, board) + "\n")
    out.write("\nruntimes: " + ", ".join(f"{item.version} ({item.tag})" for item in catalog.runtimes) + "\n")


if __name__ == "__main__":
    sys.exit(main())
