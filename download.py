"""Fetch one file over HTTP(S) the way the Hugging Face hub serves it.

A URL such as https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors
answers with a redirect to a CDN. On that first (redirect) response the hub also tells us the
file's sha256 and byte size. This module

1. returns at once if `dest` already exists (only verified files ever get that name),
2. asks for the sha256 and size with a HEAD request that does not follow the redirect,
3. streams the body into `<dest>.incomplete`, resuming a cut transfer with a Range request,
4. retries network hiccups and server errors a few times with a short pause,
5. checks size and sha256, and only then renames the file to `dest`,
6. after a failure leaves only what a next try can resume: the partial file's bytes, if it got
   any; else no empty file and none of the folders it made for `dest`.

Use it from Python:

    from pathlib import Path
    from download import download
    url = "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors"
    download(url, Path("weights/gpt2/model.safetensors"))

or from the shell:

    .venv/bin/python download.py URL DEST

Tests: .venv/bin/python -m pytest -q tests/test_download.py
"""

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import requests

import flags
from flags import UserError

# Before retry number n we sleep min(BACKOFF_BASE * n, BACKOFF_CAP) seconds.
# Module-level so that tests can set it to 0 and stay fast.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 4.0

# Bytes handed to us per read. Big enough that Python overhead per chunk does not matter,
# small because a connection cut in the middle of a read loses that whole read: requests
# raises instead of returning the partial chunk, and the next attempt fetches it again.
CHUNK_SIZE = 64 * 1024

MB = 1_000_000

SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# A resumed answer says which bytes it carries, e.g. "bytes 1000-4999/5000" (RFC 9110 §14.4).
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

# The answer to an unsatisfiable range names the real length: "bytes */5000" (RFC 9110 §15.5.17).
UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")

# We want the file's exact bytes. Without this, requests asks for gzip, and a server may then
# send fewer bytes than the file holds, which would break size checks and Range offsets.
# huggingface_hub sends the same header (get_hf_file_metadata in file_download.py).
BASE_HEADERS = {"Accept-Encoding": "identity"}


class _RetryableError(Exception):
    """A failure that may go away on a second try: network trouble or an overloaded server."""


def download(
    url: str,
    dest: Path,
    *,
    timeout: float = 30.0,
    retries: int = 4,
    progress: bool = True,
    sha256: str | None = None,
    size: int | None = None,
) -> Path:
    """Download `url` to `dest` and return `dest`; raise UserError if that is impossible.

    `timeout` bounds each wait for the server (connecting, or the gap between two reads), not
    the whole transfer. `sha256` and `size` override what the server reports about the file.
    """
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    dest = Path(dest)
    if dest.exists():
        # Nothing but a verified file is ever renamed to `dest`, so this one is good.
        return dest
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    partial = dest.with_name(dest.name + ".incomplete")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with requests.Session() as session:
            want_sha256, want_size, digest = _fetch_with_retries(
                session, url, partial, timeout, retries, progress, sha256, size
            )
        _verify(partial, digest, want_sha256, want_size, url)
        os.replace(partial, dest)
    except requests.RequestException as err:
        # Problems no retry can fix, such as a malformed URL or a redirect loop.
        _leave_only_resumable(partial, created)
        raise UserError(f"download failed: {err} for {url}") from None
    except OSError as err:  # our side: a folder that cannot be made, a full disk
        _leave_only_resumable(partial, created)
        raise UserError(f"cannot write {err.filename or partial}: "
                            f"{err.strerror or err}") from None
    except BaseException as err:  # UserError, Ctrl-C
        kept = _leave_only_resumable(partial, created)
        if kept and isinstance(err, UserError):
            raise UserError(f"{err}; {kept / MB:.1f} MB kept in {partial} for the next try "
                                "to resume") from None
        raise
    return dest


def _leave_only_resumable(partial: Path, created: list[Path]) -> int:
    """After a failure, keep only what a next try can use: the bytes of `partial`, if any,
    which it resumes after. An empty partial file goes, and so do the folders this download
    made (`created`, deepest first) once nothing is left in them. Returns the bytes kept."""
    kept = partial.stat().st_size if partial.exists() else 0
    if not kept:
        partial.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()  # only an empty folder: anything else in it stays
            except OSError:
                break
    return kept


def _fetch_with_retries(session, url, partial, timeout, retries, progress, sha256, size):
    """Bring `partial` to the full file, trying up to 1 + `retries` times.

    Return (expected sha256, expected size, sha256 of what we got).
    """
    metadata = None
    for attempt in range(retries + 1):
        if attempt > 0:
            time.sleep(min(BACKOFF_BASE * attempt, BACKOFF_CAP))
        try:
            if metadata is None:
                metadata = _remote_metadata(session, url, timeout)
            want_sha256 = sha256.lower() if sha256 is not None else metadata[0]
            want_size = size if size is not None else metadata[1]
            digest = _fetch_once(session, url, partial, timeout, want_size, progress)
            return want_sha256, want_size, digest
        except _RetryableError as err:
            reason = str(err)
            if progress and attempt < retries:
                name = partial.name.removesuffix(".incomplete")
                print(f"{name}: {reason}, retry {attempt + 1} of {retries}", file=sys.stderr)
    raise UserError(f"download failed after {retries + 1} attempts for {url}: {reason}")


def _remote_metadata(session, url, timeout):
    """Ask the server for the file's (sha256, size) without downloading it; None if unknown.

    The hub puts them in X-Linked-ETag and X-Linked-Size on its redirect response, and the CDN
    behind the redirect does not repeat them, so this HEAD must not follow redirects.
    Header names as used by get_hf_file_metadata in huggingface_hub/file_download.py.
    """
    response = _send(session, "HEAD", url, timeout, {}, follow_redirects=False)
    response.close()
    headers = response.headers

    etag = _normalize_etag(headers.get("X-Linked-ETag") or headers.get("ETag"))
    # Small files that are not stored in LFS carry a git sha1 (40 hex digits) instead.
    file_sha256 = etag if etag is not None and SHA256_HEX.fullmatch(etag) else None

    size_text = headers.get("X-Linked-Size")
    if size_text is None and response.status_code < 300:
        # On a redirect, Content-Length measures the redirect's own tiny body, not the file.
        size_text = headers.get("Content-Length")
    file_size = int(size_text) if size_text is not None and size_text.isdigit() else None
    return file_sha256, file_size


def _normalize_etag(value):
    """Strip the quotes and the optional W/ (weak) marker from an ETag (RFC 9110 §8.8.3)."""
    if value is None:
        return None
    return value.strip().removeprefix("W/").strip('"').lower()


def _fetch_once(session, url, partial, timeout, want_size, progress):
    """Make one attempt at completing `partial`; return the sha256 hex digest of its bytes.

    Raise _RetryableError when the attempt failed in a way worth repeating. Bytes already
    written stay in `partial`, so the next attempt resumes after them.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    response = _get(session, url, offset, timeout)

    if response.status_code == 416:
        response.close()
        real_length = _unsatisfied_length(response)
        if real_length is None:
            real_length = want_size
        if offset == real_length:
            # An earlier run got every byte but stopped before verifying them.
            return _hash_file(partial).hexdigest()
        # Our partial file is longer than the remote file, so it is not a prefix of it.
        partial.unlink()
        offset = 0
        response = _get(session, url, offset, timeout)

    with response:
        if response.status_code == 206:
            start, end = _content_range(response)
            if start != offset:
                partial.unlink()
                raise _RetryableError(f"server resumed at byte {start} instead of {offset}")
            # Resuming: the digest must cover the bytes we already have, so read them first.
            hasher = _hash_file(partial)
            mode = "ab"
        else:
            # A 200 carries the whole file (the server ignored our Range), so start over.
            offset = 0
            hasher = hashlib.sha256()
            mode = "wb"
            length = response.headers.get("Content-Length", "")
            end = int(length) if length.isdigit() else None

        total = want_size if want_size is not None else end
        bar = None
        if progress:
            name = partial.name.removesuffix(".incomplete")
            bar = flags.Progress(name, total, "MB", MB, start=offset)
        done = _stream(response, partial, mode, hasher, offset, timeout, bar)

    if end is not None and done < end:
        raise _RetryableError(f"body ended early at byte {done} of {end}")
    return hasher.hexdigest()


def _stream(response, partial, mode, hasher, done, timeout, bar):
    """Copy the response body into `partial`, feeding `hasher`; return the file's new length."""
    try:
        with open(partial, mode) as file:
            for chunk in response.iter_content(CHUNK_SIZE):
                file.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                if bar is not None:
                    bar.update(done)
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as err:
        raise _RetryableError(_describe(err, timeout)) from None
    finally:
        if bar is not None:
            bar.finish(done)
    return done


def _get(session, url, offset, timeout):
    """Start a streaming GET, asking only for the bytes from `offset` on when it is not 0."""
    headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
    return _send(session, "GET", url, timeout, headers, follow_redirects=True)


def _send(session, method, url, timeout, headers, follow_redirects):
    """Send one request; sort failures into retryable (_RetryableError) and final (UserError).

    416 comes back to the caller: it answers a Range request and is handled there.
    """
    try:
        response = session.request(
            method,
            url,
            headers={**BASE_HEADERS, **headers},
            timeout=timeout,
            allow_redirects=follow_redirects,
            stream=True,
        )
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _RetryableError(_describe(err, timeout)) from None

    status = response.status_code
    if status >= 500:
        response.close()
        raise _RetryableError(f"server answered {status} {response.reason}")
    if status >= 400 and status != 416:
        response.close()
        # A missing file or a refused permission will not change if we ask again.
        raise UserError(f"download failed: {status} {response.reason} for {url}")
    return response


def _describe(err, timeout):
    """Turn a requests exception into a few words for a human."""
    # requests reports a read timeout in the middle of a body as a ConnectionError,
    # so the type alone does not tell timeouts apart.
    if isinstance(err, requests.Timeout) or "timed out" in str(err):
        return f"timed out after {timeout} s without data"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "connection closed in the middle of the body"
    return f"connection failed ({type(err).__name__})"


def _content_range(response):
    """Return (first byte, length of the whole file) from a 206 answer's Content-Range."""
    match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        raise _RetryableError("server sent 206 without a usable Content-Range")
    start = int(match[1])
    # The last byte's index + 1 is where the file ends once this body has arrived.
    end = int(match[2]) + 1
    return start, end


def _unsatisfied_length(response):
    """Return the file length named by a 416 answer, or None if it names none."""
    match = UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match is not None else None


def _hash_file(path):
    """Return a sha256 object that has already consumed the bytes of `path`."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher


def _verify(partial, digest, want_sha256, want_size, url):
    """Raise UserError (and delete `partial`) unless size and sha256 match what we expect."""
    got_size = partial.stat().st_size
    if want_size is not None and got_size != want_size:
        partial.unlink()
        raise UserError(
            f"size check failed: expected {want_size} bytes, got {got_size} for {url}"
        )
    if want_sha256 is not None and digest != want_sha256:
        partial.unlink()
        raise UserError(
            f"sha256 check failed: expected {want_sha256[:12]}..., got {digest[:12]}... for {url}"
        )


def sha256_hex(text: str) -> str:
    """--sha256: 64 hexadecimal digits, read where argparse reads the flag."""
    if not SHA256_HEX.fullmatch(text.lower()):
        raise argparse.ArgumentTypeError(f"expected 64 hexadecimal digits, got {text!r}")
    return text.lower()


def main(argv=None) -> int:
    """The command line; every way it ends is flags.run's (a failed download: one `error:`
    line and exit status 2)."""
    return flags.run(command, argv)


def command(argv=None) -> int:
    parser = flags.Parser(description="Download one file, verified and resumable.")
    parser.add_argument("url", help="what to fetch, e.g. a Hugging Face resolve URL")
    parser.add_argument("dest", type=Path, help="where the verified file goes")
    parser.add_argument("--sha256", type=sha256_hex,
                        help="expected sha256 (overrides what the server says)")
    args = parser.parse_args(argv)
    print(download(args.url, args.dest, sha256=args.sha256))
    return 0


if __name__ == "__main__":
    sys.exit(main())
