"""Where shards live: local paths, ``file:``, ``http(s)://``, ``pipe:`` commands and object stores, opened as streams.

Opening goes through webdataset's openers (``webdataset.gopen`` and its ``Pipe``), the library cluster users already
name their shards with: ``pipe:aws s3 cp s3://bucket/train-000001.tar -``, ``pipe:gsutil cat gs://...``, ``http://``
(webdataset runs ``curl``). ``s3://``, ``gs://`` and any other scheme fsspec has a backend for open through fsspec
(s3fs and gcsfs are the ``remote`` extra); the rest go to webdataset's ``gopen``. ldm adds one thing around them: a
failing command or an unreachable URL raises a ShardError that names the URL and the command's stderr, where
webdataset alone would print to the terminal and raise a bare exit status.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from ldm.errors import ConfigError

OBJECT_STORE_HOW = {  # what to do when a scheme has no opener here
    "s3": "pip install 'ldm[remote]' (s3fs), or name the shards as 'pipe:aws s3 cp s3://bucket/x.tar -'",
    "gs": "pip install 'ldm[remote]' (gcsfs), or name the shards as 'pipe:gsutil cat gs://bucket/x.tar'",
}
PIPE_OK = (0, 141)  # 141: SIGPIPE, the reader stopped early (webdataset ignores it too)
CURL_OK = (0, 23, 141)  # 23: curl's write error when the reader closed the pipe early
CURL_RETRY = ["--retry", "30", "--retry-delay", "2"]  # webdataset's: a 5xx, 408 or 429 answer is asked again


class ShardError(ConfigError):
    """A shard that cannot be read (missing, truncated, corrupt or unreachable); the message names it and, where
    known, the byte offset or the command's stderr. ``member`` is the name of the member the damage cut short,
    where its header was intact."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


class FetchError(ShardError):
    """A shard that could not be fetched (missing, an unreachable URL, a failing command or object-store read), as
    opposed to one whose bytes are damaged: the reader retries it and never counts its samples as lost."""


def is_local(url: str | os.PathLike) -> bool:
    """True for a plain path or a ``file:`` URL (a scheme of one letter is a Windows drive, not a URL)."""
    scheme = urlparse(str(url)).scheme
    return len(scheme) <= 1 or scheme == "file"


def local_path(url: str | os.PathLike) -> Path:
    """The file a local URL names (``file:///x/y.tar`` -> ``/x/y.tar``)."""
    text = str(url)
    if urlparse(text).scheme == "file":
        return Path(url2pathname(urlparse(text).path))
    return Path(text)


def shard_name(url: str) -> str:
    """The shard's file name: the last ``*.tar`` path component of the URL (of a ``pipe:`` command's too), else the
    last path component."""
    found = re.findall(r"[^/\s'\"]+\.tar\b", url)
    if found:
        return found[-1]
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def sibling(url: str, name: str) -> str:
    """The URL of the file ``name`` beside shard ``url``, opened the same way: ``http://h/d/000001.tar`` ->
    ``http://h/d/index.json``; ``pipe:aws s3 cp s3://b/d/000001.tar -`` -> ``pipe:aws s3 cp s3://b/d/index.json -``.
    """
    if is_local(url):
        return str(local_path(url).parent / name)
    shard = shard_name(url)
    at = url.rfind(shard)
    if at < 0:
        raise ConfigError(f"cannot tell the shard name in {url!r} (expected a '*.tar' component)")
    return url[:at] + name + url[at + len(shard):]


class _CommandStream:
    """A reader over a command's stdout (webdataset's ``Pipe``) whose stderr goes to a temporary file, so that a
    failure can be reported with what the command said."""

    def __init__(self, url: str, args: Any, shell: bool, ok: tuple[int, ...], bufsize: int = 1 << 20) -> None:
        from webdataset.gopen import Pipe

        self.url, self.ok = url, ok
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.pipe = Pipe(args, mode="rb", shell=shell, bufsize=bufsize, ignore_errors=True, stderr=self.stderr)

    def read(self, n: int = -1) -> bytes:
        data = self.pipe.stream.read(n)
        if not data or n < 0:  # at the end of the output: did the command succeed?
            self.check()
        return data

    def check(self) -> None:
        """Wait for the command and raise a ShardError naming the URL and its stderr if it failed."""
        status = self.pipe.proc.wait()
        if status not in self.ok:
            self.stderr.seek(0)
            said = self.stderr.read().decode(errors="replace").strip()[-2000:]
            raise FetchError(f"reading {self.url} failed: the command exited with status {status}"
                             + (f"; its stderr: {said}" if said else " (it wrote nothing to stderr)"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pipe.stream.close()
        with contextlib.suppress(Exception):
            if self.pipe.proc.poll() is None:
                self.pipe.proc.kill()
            self.pipe.proc.wait()
        self.stderr.close()

    def __enter__(self) -> _CommandStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def open_url(url: str | os.PathLike, timeout: float = 30.0) -> Iterator[IO[bytes]]:
    """Open a shard URL for reading, as a stream; the errors of a missing file, an unreachable or failing URL or a
    failing ``pipe:`` command are ShardErrors that name the URL (and the command's stderr)."""
    text = str(url)
    if is_local(text):
        path = local_path(text)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise FetchError(f"shard {path} does not exist") from None
        except OSError as err:
            raise FetchError(f"cannot read shard {path}: {err}") from None
        with f:
            yield f
        return
    scheme = urlparse(text).scheme
    if scheme == "pipe":
        stream = _CommandStream(text, text[len("pipe:"):], shell=True, ok=PIPE_OK)
    elif scheme in ("http", "https"):  # webdataset's curl opener and retries, with curl's own message kept (-sS)
        args = ["curl", "--connect-timeout", str(int(timeout)), *CURL_RETRY, "-f", "-sS", "-L", text]
        stream = _CommandStream(text, args, shell=False, ok=CURL_OK)
    elif fsspec_backend(scheme):
        stream = _fsspec_open(text)
    else:
        from webdataset.gopen import gopen, gopen_schemes

        if scheme not in gopen_schemes:
            how = OBJECT_STORE_HOW.get(scheme, "use a pipe: command that writes the shard to stdout")
            raise ConfigError(f"{text}: no opener for {scheme}:// URLs here: {how}")
        try:
            stream = gopen(text, "rb")
        except (OSError, ValueError) as err:
            raise FetchError(f"cannot open {text}: {err}") from None
    try:
        yield stream
    finally:
        stream.close()


def fsspec_backend(scheme: str) -> bool:
    """True when fsspec is installed and has a usable backend for ``scheme`` (``s3`` needs s3fs, ``gs`` gcsfs)."""
    if scheme in ("", "file", "pipe", "http", "https"):
        return False
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return False
    return True


def _fsspec_open(url: str) -> IO[bytes]:
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise FetchError(f"shard {url} does not exist") from None
    except Exception as err:  # the backends raise their own error types
        raise FetchError(f"cannot open {url}: {type(err).__name__}: {err}") from None


def read_small(url: str | os.PathLike, missing_ok: bool = True) -> bytes | None:
    """The whole content of a small file (an ``index.json``) at ``url``; None when it is not there and
    ``missing_ok`` (any failure to read a remote one counts as not there: the caller counts the samples instead)."""
    if is_local(url):
        path = local_path(url)
        if not path.is_file():
            if missing_ok:
                return None
            raise ShardError(f"{path}: no such file")
        return path.read_bytes()
    try:
        with open_url(url) as f:
            return f.read()
    except ShardError:
        if missing_ok:
            return None
        raise


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) for the duration of the block and yield its base URL:
    remote reading tried locally (the tests and ``bench/data.py``). The server stops when the block ends."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # no request lines on stderr
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def shard_digest(shards: Sequence[str], counts: Sequence[int], legacy: bool = False) -> str:
    """A short hash of the shards' file names (``shard_name``: of a ``pipe:`` command's too) and sample counts, in
    order: not their folders or openers, so a dataset moved to another disk or read another way resumes. ``legacy``:
    the text after the last ``/`` as the name, as states saved before recorded it."""
    digest = hashlib.sha256()
    for shard, count in zip(shards, counts, strict=True):
        name = str(shard).rstrip("/").rsplit("/", 1)[-1] if legacy else shard_name(str(shard))
        digest.update(f"{name}:{count};".encode())
    return digest.hexdigest()[:12]
