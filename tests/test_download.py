"""Tests for download.py against a local server that behaves like the Hugging Face hub.

The fake hub answers /openai-community/tiny/resolve/main/model.safetensors with a 302 to
/cdn/blob and the file's sha256 and size in X-Linked-ETag / X-Linked-Size; /cdn/blob serves
the bytes and honours `Range: bytes=N-`. Each test switches on the misbehaviour it needs
(cut body, corrupt byte, 404, 503, stall) and reads back the log of requests the server saw.

Run: .venv/bin/python -m pytest -q tests/test_download.py
"""

import hashlib
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import download as dl
from flags import UserError

RESOLVE_PATH = "/openai-community/tiny/resolve/main/model.safetensors"
BLOB_PATH = "/cdn/blob"
PLAIN_PATH = "/plain/notes.txt"

BODY = random.Random(0).randbytes(300_000)
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
PLAIN_TEXT = b"a plain text file, served without any hub headers\n" * 100

# Longest a stalled handler waits before giving up; teardown releases it sooner.
STALL_SECONDS = 5.0


@dataclass
class FakeHub:
    """What the fake hub does next, and a log of what it was asked."""

    base_url: str = ""
    etag_header: str | None = f'"{BODY_SHA256}"'  # None: send no X-Linked-ETag
    linked_size: int | None = len(BODY)  # None: send no X-Linked-Size
    resolve_status: int | None = None  # answer the resolve URL with this error instead
    blob_errors: list = field(default_factory=list)  # errors for the next blob requests
    cut_after: int | None = None  # send this many body bytes once, then hang up
    corrupt: bool = False  # flip one byte of the body
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    stall: str | None = None  # "headers" or "body": go silent there
    requests: list = field(default_factory=list)  # (method, path, Range header or None)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path=RESOLVE_PATH):
        return self.base_url + path

    def blob_ranges(self):
        """The Range header of every GET that reached the CDN blob, in order."""
        return [rng for method, path, rng in self.requests if (method, path) == ("GET", BLOB_PATH)]


class FakeHubHandler(BaseHTTPRequestHandler):
    # Server-side socket timeout: no request can hold a handler thread for long.
    timeout = STALL_SECONDS

    def log_message(self, format, *args):
        # The default writes every request to stderr, which would pollute capsys.
        pass

    def do_HEAD(self):
        self.serve(send_body=False)

    def do_GET(self):
        self.serve(send_body=True)

    def serve(self, send_body):
        hub = self.server.hub
        with hub.lock:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
        if self.path == RESOLVE_PATH:
            self.serve_resolve(hub)
        elif self.path == BLOB_PATH:
            self.serve_blob(hub, send_body)
        elif self.path == PLAIN_PATH:
            self.serve_plain(send_body)
        else:
            self.send_error(404)

    def serve_resolve(self, hub):
        if hub.resolve_status is not None:
            self.send_error(hub.resolve_status)
            return
        self.send_response(302)
        self.send_header("Location", BLOB_PATH)
        if hub.etag_header is not None:
            self.send_header("X-Linked-ETag", hub.etag_header)
        if hub.linked_size is not None:
            self.send_header("X-Linked-Size", str(hub.linked_size))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def serve_blob(self, hub, send_body):
        if hub.blob_errors:
            self.send_error(hub.blob_errors.pop(0))
            return
        if hub.stall == "headers":
            hub.release.wait(STALL_SECONDS)
            return

        body = bytearray(BODY)
        if hub.corrupt:
            body[1234] ^= 0xFF
        start = 0
        range_header = self.headers.get("Range")
        if range_header is not None and not hub.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = bytes(body[start:])
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if not send_body:
            return

        if hub.cut_after is not None:
            cut, hub.cut_after = hub.cut_after, None
            # Returning closes the connection (HTTP/1.0), short of the promised length.
            self.wfile.write(part[:cut])
            return
        if hub.stall == "body":
            self.wfile.write(part[:1000])
            hub.release.wait(STALL_SECONDS)
            return
        self.wfile.write(part)

    def serve_plain(self, send_body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(PLAIN_TEXT)))
        self.end_headers()
        if send_body:
            self.wfile.write(PLAIN_TEXT)


class FakeHubServer(ThreadingHTTPServer):
    def __init__(self, hub):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.hub = hub

    def handle_error(self, request, client_address):
        # Clients hanging up mid-answer is what several tests do on purpose.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@pytest.fixture
def hub():
    state = FakeHub()
    server = FakeHubServer(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    host, port = server.server_address
    state.base_url = f"http://{host}:{port}"
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def fast_and_local(monkeypatch):
    monkeypatch.setattr(dl, "BACKOFF_BASE", 0.0)
    # A proxy configured in the environment must not intercept our 127.0.0.1 server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def test_downloads_hub_file_through_redirect(hub, tmp_path):
    dest = tmp_path / "weights" / "tiny" / "model.safetensors"
    result = dl.download(hub.url(), dest, progress=False)
    assert result == dest
    assert dest.read_bytes() == BODY
    assert list(tmp_path.rglob("*.incomplete")) == []
    assert hub.requests == [
        ("HEAD", RESOLVE_PATH, None),
        ("GET", RESOLVE_PATH, None),
        ("GET", BLOB_PATH, None),
    ]


def test_existing_dest_is_a_cache_hit_without_requests(hub, tmp_path):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"verified earlier")
    assert dl.download(hub.url(), dest, progress=False) == dest
    assert dest.read_bytes() == b"verified earlier"
    assert hub.requests == []


def test_cut_transfer_resumes_with_range(hub, tmp_path, monkeypatch):
    # A read cut in the middle is discarded, so cut on a chunk boundary to know N exactly.
    monkeypatch.setattr(dl, "CHUNK_SIZE", 50_000)
    hub.cut_after = 100_000
    dest = tmp_path / "model.safetensors"
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert hub.blob_ranges() == [None, "bytes=100000-"]


def test_existing_partial_file_is_resumed(hub, tmp_path):
    dest = tmp_path / "model.safetensors"
    partial = tmp_path / "model.safetensors.incomplete"
    partial.write_bytes(BODY[:123_456])
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert not partial.exists()
    assert hub.blob_ranges() == ["bytes=123456-"]


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    hub.ignore_range = True
    dest = tmp_path / "model.safetensors"
    # Junk that would end up in the file if a 200 answer were appended to it.
    (tmp_path / "model.safetensors.incomplete").write_bytes(b"x" * 5000)
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert hub.blob_ranges() == ["bytes=5000-"]


def test_complete_but_unverified_partial_is_verified_after_416(hub, tmp_path):
    dest = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.incomplete").write_bytes(BODY)
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert hub.blob_ranges() == [f"bytes={len(BODY)}-"]


@pytest.mark.parametrize("etag_header", [f'"{BODY_SHA256}"', f'W/"{BODY_SHA256}"'])
def test_corrupted_body_fails_sha256_and_leaves_nothing(hub, tmp_path, etag_header):
    hub.etag_header = etag_header
    hub.corrupt = True
    dest = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match="sha256") as caught:
        dl.download(hub.url(), dest, progress=False)
    assert BODY_SHA256[:12] in str(caught.value)
    assert not dest.exists()
    assert not (tmp_path / "model.safetensors.incomplete").exists()


def test_wrong_linked_size_fails_size_check(hub, tmp_path):
    hub.linked_size = len(BODY) + 1
    dest = tmp_path / "model.safetensors"
    with pytest.raises(UserError, match="size") as caught:
        dl.download(hub.url(), dest, progress=False)
    assert f"expected {len(BODY) + 1} bytes, got {len(BODY)}" in str(caught.value)
    assert not dest.exists()
    assert not (tmp_path / "model.safetensors.incomplete").exists()


def test_explicit_size_and_sha256_override_headers(hub, tmp_path):
    hub.linked_size = len(BODY) + 1
    dest = tmp_path / "model.safetensors"
    dl.download(hub.url(), dest, progress=False, size=len(BODY))
    assert dest.read_bytes() == BODY

    other = tmp_path / "other.safetensors"
    with pytest.raises(UserError, match="sha256 check failed: expected 000000000000"):
        dl.download(hub.url(), other, progress=False, size=len(BODY), sha256="0" * 64)
    assert not other.exists()


def test_404_fails_at_once_without_retries(hub, tmp_path):
    hub.resolve_status = 404
    with pytest.raises(UserError) as caught:
        dl.download(hub.url(), tmp_path / "model.safetensors", progress=False, retries=4)
    message = str(caught.value)
    assert "404" in message
    assert hub.url() in message
    assert "\n" not in message
    assert len(hub.requests) == 1


def test_server_error_is_retried(hub, tmp_path):
    hub.blob_errors = [503]
    dest = tmp_path / "model.safetensors"
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert hub.blob_ranges() == [None, None]


@pytest.mark.parametrize("where", ["headers", "body"])
def test_stall_past_timeout_fails_after_retries(hub, tmp_path, where):
    hub.stall = where
    dest = tmp_path / "model.safetensors"
    started = time.monotonic()
    with pytest.raises(UserError, match="after 3 attempts .*timed out"):
        dl.download(hub.url(), dest, progress=False, timeout=0.5, retries=2)
    elapsed = time.monotonic() - started
    # Three waits of 0.5 s each plus request overhead; a missing timeout would take 15 s.
    assert elapsed < 3.0
    assert len(hub.blob_ranges()) == 3
    assert not dest.exists()


def test_plain_server_without_hub_headers(hub, tmp_path):
    dest = tmp_path / "notes.txt"
    dl.download(hub.url(PLAIN_PATH), dest, progress=False)
    assert dest.read_bytes() == PLAIN_TEXT
    assert [path for _, path, _ in hub.requests] == [PLAIN_PATH, PLAIN_PATH]


def test_redirect_without_linked_headers_still_works(hub, tmp_path):
    # The redirect's own Content-Length (0) must not be taken for the file's size.
    hub.etag_header = None
    hub.linked_size = None
    dest = tmp_path / "model.safetensors"
    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY


def test_progress_goes_to_stderr(hub, tmp_path, capsys):
    dl.download(hub.url(), tmp_path / "model.safetensors", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("\r")
    assert captured.err.endswith("\n")
    last_line = captured.err.rstrip("\n").split("\r")[-1]
    assert "0.3/0.3 MB" in last_line
    assert "100.0%" in last_line
    assert "MB/s" in last_line
    assert "ETA" in last_line


def test_progress_redraws_at_most_ten_times_a_second(hub, tmp_path, capsys, monkeypatch):
    # 300 chunks: without throttling there would be ~300 redraws.
    monkeypatch.setattr(dl, "CHUNK_SIZE", 1000)
    started = time.monotonic()
    dl.download(hub.url(), tmp_path / "model.safetensors", progress=True)
    elapsed = time.monotonic() - started
    redraws = capsys.readouterr().err.count("\r")
    assert 1 <= redraws <= 2 + 10 * elapsed


def test_progress_false_is_silent(hub, tmp_path, capsys):
    hub.cut_after = 1000
    dl.download(hub.url(), tmp_path / "model.safetensors", progress=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_interrupt_leaves_partial_and_next_run_resumes(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "CHUNK_SIZE", 50_000)
    real_iter_content = requests.Response.iter_content

    def first_chunk_then_ctrl_c(self, chunk_size=1, decode_unicode=False):
        chunks = real_iter_content(self, chunk_size)
        yield next(chunks)
        raise KeyboardInterrupt

    dest = tmp_path / "model.safetensors"
    partial = tmp_path / "model.safetensors.incomplete"
    with monkeypatch.context() as patch:
        patch.setattr(requests.Response, "iter_content", first_chunk_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            dl.download(hub.url(), dest, progress=False)
    assert not dest.exists()
    assert partial.read_bytes() == BODY[:50_000]

    dl.download(hub.url(), dest, progress=False)
    assert dest.read_bytes() == BODY
    assert hub.blob_ranges() == [None, "bytes=50000-"]


def test_command_line_failure_is_one_error_line_and_status_2(hub, tmp_path, capsys):
    hub.resolve_status = 404
    dest = tmp_path / "model.safetensors"
    assert dl.main([hub.url(), str(dest)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "404" in lines[0]
    assert captured.out == "" and not dest.exists()


def test_command_line_refuses_a_malformed_sha256_before_any_request(hub, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        dl.main([hub.url(), str(tmp_path / "x"), "--sha256", "abc"])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--sha256" in lines[0] and "'abc'" in lines[0]
    assert hub.requests == []


def test_command_line_prints_the_verified_path(hub, tmp_path, capsys):
    dest = tmp_path / "model.safetensors"
    assert dl.main([hub.url(), str(dest), "--sha256", BODY_SHA256.upper()]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert dest.read_bytes() == BODY


# Port 9 ("discard") on the loopback interface has no listener: a connection is refused at once.
CLOSED_URL = "http://127.0.0.1:9/openai-community/gpt2/resolve/main/model.safetensors"


@pytest.mark.parametrize("failure", ["404", "connection refused"])
def test_a_failed_download_leaves_no_folder_it_made(hub, tmp_path, failure):
    # a fresh clone offline: `gpt.py` once left an empty weights/gpt2/ behind
    hub.resolve_status = 404
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    dest = tmp_path / "kept" / "weights" / "gpt2" / "model.safetensors"
    url = hub.url() if failure == "404" else CLOSED_URL
    with pytest.raises(UserError):
        dl.download(url, dest, progress=False, retries=1)
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_ctrl_c_before_any_byte_leaves_nothing(hub, tmp_path, monkeypatch):
    def no_chunk_then_ctrl_c(self, chunk_size=1, decode_unicode=False):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(requests.Response, "iter_content", no_chunk_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dl.download(hub.url(), tmp_path / "weights" / "model.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_keeps_received_bytes_to_resume_and_says_so(hub, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(dl, "CHUNK_SIZE", 50_000)
    hub.cut_after = 100_000
    dest = tmp_path / "weights" / "model.safetensors"
    real_send = dl._send
    calls = []

    def cut_then_gone(session, method, url, *args, **kwargs):
        calls.append(method)
        if len(calls) > 2:  # the HEAD, the GET that is cut: then the file is gone
            hub.resolve_status = 404
        return real_send(session, method, url, *args, **kwargs)

    monkeypatch.setattr(dl, "_send", cut_then_gone)
    with pytest.raises(UserError, match="0.1 MB kept in .*model.safetensors.incomplete"):
        dl.download(hub.url(), dest, progress=False)
    partial = dest.with_name("model.safetensors.incomplete")
    assert partial.read_bytes() == BODY[:100_000]
