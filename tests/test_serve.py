"""The live workbench (serve.py) over HTTP, against Hugging Face: /api/run's attention, next-token
probabilities, loss and logit lens, /api/ablate's losses (its heads rewritten at c_proj's
input), /api/patch's grids and /api/generate's greedy tokens, all from the committed fixtures
(tests/make_fixtures.py); the refusals (bad JSON, a big body, a foreign Host or Origin, an
unknown head), each followed by a good request; the page in headless Chromium; and true
subprocesses of `gpt.py --serve` and `transformer.py --serve` that Ctrl-C ends.
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_near
from test_heads import CHROMIUM, dump_dom

import gpt
import patching
import serve

FIXTURES = REPO / "tests" / "fixtures"
TRAINED = FIXTURES / "tiny-gpt2-trained" / "model.safetensors"
HOOKS = np.load(FIXTURES / "tiny-gpt2-hooks.npz")
CAUSES = np.load(FIXTURES / "tiny-gpt2-trained-causes.npz")
PATCH = np.load(FIXTURES / "tiny-gpt2-patching.npz")
REFERENCE = np.load(FIXTURES / "tiny-gpt2-reference.npz")
ROMEO = "ROMEO: Is the day so young? The day is young, and so am I, my lord."  # the fixtures' 22
CLEAN = "When John and Mary went to the store, Mary gave a drink to"
CORRUPT = "When John and Mary went to the store, John gave a drink to"


def start(weights: Path, example: str = "Hello there"):
    """A workbench on weights, served from a thread of this process on a free port."""
    model = gpt.load_gpt2("gpt2", weights)
    bench = serve.Workbench(model, serve.gpt2_vocab(gpt.tokenizer()), weights.parent.name,
                            example)
    server = serve.make_server(bench, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server():
    server = start(TRAINED)
    yield server
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """-> (status, the JSON answer or the bytes of a page)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    reply = conn.getresponse()
    payload = reply.read()
    conn.close()
    kind = reply.getheader("Content-Type", "")
    return reply.status, (json.loads(payload) if kind.startswith("application/json") else payload)


def post(server, path: str, body, **kw):
    return request(server, "POST", path, body, **kw)


def softmax(z):
    z = np.asarray(z, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_run_equals_hugging_face(server):
    status, got = post(server, "/api/run", {"text": ROMEO})
    assert status == 200, got
    assert got["ids"] == CAUSES["ids"].tolist() and len(got["tokens"]) == 22
    att = np.array(got["attention"])  # (L, H, T, T), rounded to 5 decimals
    for layer in range(2):
        assert_near(att[layer], HOOKS[f"trained.blocks.{layer}.attn.hook_pattern"][0],
                    f"attention of layer {layer}")
    assert att.round(5).tolist() == got["attention"]
    # the last reading of Hugging Face's logit lens is its own next-token distribution
    ids = [n["id"] for n in got["next"]]
    assert len(ids) == 10 and ids[:5] == CAUSES["top_ids"][-1, -1].tolist()
    assert_near([n["prob"] for n in got["next"][:5]], CAUSES["top_probs"][-1, -1], "next probs")
    probs = [n["prob"] for n in got["next"]]
    assert probs == sorted(probs, reverse=True)
    assert_near(got["loss"], CAUSES["base_loss"], "loss")
    lens = got["lens"]
    assert np.array(lens["ids"]).tolist() == CAUSES["top_ids"][:, :, 0].tolist()
    assert_near(lens["probs"], CAUSES["top_probs"][:, :, 0], "lens top probability")
    nxt = np.array([[np.nan if p is None else p for p in row] for row in lens["next_prob"]])
    assert np.isnan(nxt[:, -1]).all()
    assert_near(nxt[:, :-1], CAUSES["next_token_prob"], "lens next-token probability")


@pytest.mark.parametrize("heads, mean, want", [
    (["0.1"], False, CAUSES["base_loss"] + CAUSES["zero_loss_delta"][0, 1]),
    (["1.0"], False, CAUSES["base_loss"] + CAUSES["zero_loss_delta"][1, 0]),
    (["0.1", "1.0"], False, CAUSES["zero_0.1_1.0_loss"]),
    (["1.1"], True, CAUSES["base_loss"] + CAUSES["causal_loss_delta"][1, 1]),
    # (the fixture's mean over all positions is over the 21 inputs of its loss, not over 22)
])
def test_ablate_equals_hugging_face(server, heads, mean, want):
    status, got = post(server, "/api/ablate", {"text": ROMEO, "heads": heads, "mean": mean})
    assert status == 200, got
    assert_near(got["loss"], want, f"loss with {heads} knocked out")
    assert got["heads"] == heads
    # the scan's answer: the same loss and prediction, without the maps and the lens
    _, bare = post(server, "/api/ablate", {"text": ROMEO, "heads": heads, "mean": mean,
                                           "views": False})
    assert bare["loss"] == got["loss"] and bare["next"] == got["next"]
    assert "attention" not in bare and "lens" not in bare
    # the lens reads the ablated pass: its embedding row is untouched, its last row moved
    _, plain = post(server, "/api/ablate", {"text": ROMEO, "heads": []})
    assert_near(plain["loss"], CAUSES["base_loss"], "loss with no head knocked out")
    assert got["lens"]["probs"][0] == plain["lens"]["probs"][0]
    assert got["lens"]["probs"][-1] != plain["lens"]["probs"][-1]


def test_ablated_lens_equals_hugging_face(server, monkeypatch):
    """/api/ablate's lens with head 0.1 zeroed against Hugging Face's (the c_proj hook): read
    whole, with no plain lens kept, and with block 0's row (before the knocked-out head) taken
    from /api/run's lens of the same text (read_lens), which reads one group fewer."""
    def lens_of(got):
        lens = got["lens"]
        nxt = np.array([[np.nan if p is None else p for p in row] for row in lens["next_prob"]])
        return np.array(lens["ids"]), np.array(lens["probs"]), nxt[:, :-1]

    bench, reads = server.workbench, []
    lens = bench.lens

    def counted(size, rows):  # counts the replays of the group reading
        group, last = lens(size, rows)
        return (lambda *a: reads.append(1) or group(*a)), last

    monkeypatch.setattr(bench, "lens", counted)
    bench.plain_lens.clear()
    for fresh in (True, False):
        if not fresh:
            assert post(server, "/api/run", {"text": ROMEO})[0] == 200
            assert len(bench.plain_lens) == 1
        reads.clear()
        status, got = post(server, "/api/ablate", {"text": ROMEO, "heads": ["0.1"]})
        assert status == 200, got
        assert len(reads) == (2 if fresh else 1)  # the fixture's 2 blocks, one group each
        ids, probs, nxt = lens_of(got)
        assert ids.tolist() == CAUSES["ablated_top_ids"][:, :, 0].tolist()
        # 1e-5 of float32 arithmetic and half a unit of the fifth decimal they travel rounded to
        tol = 1e-5 + 0.5 * 10 ** -serve.DIGITS
        assert_near(probs, CAUSES["ablated_top_probs"][:, :, 0], "ablated lens top probability",
                    tol)
        assert_near(nxt, CAUSES["ablated_next_token_prob"], "ablated lens next-token probability",
                    tol)
        # the rows after block 0 moved: the oracle tells the ablated lens from the plain one
        assert np.abs(probs[1:] - CAUSES["top_probs"][1:, :, 0]).max() > 1e-3
        if fresh:
            whole = got["lens"]
        else:
            assert got["lens"] == whole


def test_patch_equals_hugging_face(server):
    status, got = post(server, "/api/patch", {"clean": CLEAN, "corrupt": CORRUPT,
                                              "answer": " John", "wrong": " Mary"})
    assert status == 200, got
    exact, guessed, dla = got["patching"], got["attribution"], got["dla"]
    for key in ("clean_logit_diff", "corrupt_logit_diff", "resid_pre", "attn_out", "mlp_out",
                "z"):
        assert_near(exact[key], PATCH[f"trained.{key}"], key)
    corrupt = float(PATCH["trained.corrupt_logit_diff"])
    for key in ("resid_pre", "attn_out", "mlp_out", "z"):  # as attribution.npz: corrupt + estimate
        assert_near(np.array(guessed[key]) - corrupt, PATCH[f"trained.attr.{key}"], key)
    for key in ("embed", "pos_embed", "heads", "mlp", "biases", "logit_diff"):
        assert_near(dla[key], PATCH[f"trained.dla.{key}"], f"dla {key}")
    assert len(got["tokens"]) == len(PATCH["corrupt_ids"])
    span = float(PATCH["trained.clean_logit_diff"]) - corrupt
    gaps = sum(int((np.abs(PATCH[f"trained.{k}"] - corrupt - PATCH[f"trained.attr.{k}"])
                    / abs(span) > 0.1).sum()) for k in ("resid_pre", "attn_out", "mlp_out", "z"))
    assert len(got["disagreements"]) == gaps


def patch_lines(server, body: dict, on_line=None) -> list[dict]:
    """POST /api/patch with "progress": true -> its JSON lines; on_line(line) after each."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("POST", "/api/patch", json.dumps({**body, "progress": True}).encode(),
                 {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type").startswith(
        "application/x-ndjson")
    lines = []
    while raw := reply.readline():  # http.client undoes the chunking
        lines.append(json.loads(raw))
        if on_line is not None:
            on_line(lines[-1])
    conn.close()
    return lines


PAIR = {"clean": CLEAN, "corrupt": CORRUPT, "answer": " John", "wrong": " Mary"}


def test_patch_reports_progress_then_the_answer_of_hugging_face(server):
    lines = patch_lines(server, PAIR)
    steps, answer = lines[:-1], lines[-1]
    total = steps[0]["total"]
    # every patched batch (4 kinds x 2 layers), then attribution patching and the DLA
    assert [s["done"] for s in steps] == list(range(1, total + 1)) and total == 4 * 2 + 2
    assert steps[0]["step"] == "blocks.0.hook_resid_pre" and steps[-1]["step"] == "dla"
    for key in ("clean_logit_diff", "corrupt_logit_diff", "resid_pre", "z"):
        assert_near(answer["patching"][key], PATCH[f"trained.{key}"], key)
    lines = patch_lines(server, {**PAIR, "grids": ["resid_pre"]})  # one grid alone
    assert lines[0]["total"] == 2 + 2 and len(lines) == 2 + 2 + 1
    assert {"resid_pre", "clean_logit_diff", "corrupt_logit_diff"} == set(lines[-1]["patching"])
    assert_near(lines[-1]["patching"]["resid_pre"], PATCH["trained.resid_pre"], "resid_pre")
    status, err = post(server, "/api/patch", {**PAIR, "grids": ["resid"]})
    assert status == 400 and "grids" in err["error"]
    status, err = post(server, "/api/patch", {**PAIR, "answer": " John Mary", "progress": True})
    assert status == 400 and "one token" in err["error"]  # refused before the scan begins
    status, err = post(server, "/api/patch", {**PAIR, "progress": 1})
    assert status == 400 and "progress" in err["error"]


def test_patch_cancel_stops_the_scan_and_serving_goes_on(server, monkeypatch):
    slow_patch = patching.patch

    def slow(*args, **kw):  # each batch takes long enough for the cancel to arrive mid-scan
        time.sleep(0.3)
        return slow_patch(*args, **kw)

    monkeypatch.setattr(patching, "patch", slow)
    assert post(server, "/api/patch/cancel", {}) == (200, {"cancelled": False})  # none runs
    sent = []

    def cancel_once(line):
        if not sent:
            sent.append(post(server, "/api/patch/cancel", {}))

    lines = patch_lines(server, PAIR, cancel_once)
    assert sent == [(200, {"cancelled": True})]
    assert lines[-1] == {"cancelled": True}
    assert len(lines) - 1 < lines[0]["total"]  # it stopped before the end
    status, got = post(server, "/api/run", {"text": ROMEO})  # and serves on
    assert status == 200 and got["tokens"]


def test_export_packs_what_the_cli_writes(server, tmp_path):
    """/api/export: a zip of the CLI's files, whose attention.npz holds Hugging Face's maps and
    lens.npz its lens."""
    import io
    import zipfile

    status, payload = post(server, "/api/export", {"text": ROMEO})
    assert status == 200 and isinstance(payload, bytes)
    packed = zipfile.ZipFile(io.BytesIO(payload))
    names = set(packed.namelist())
    assert {"attention/attention.npz", "attention/attention.html", "attention/heads.png",
            "lens/lens.npz", "lens/lens.png"} <= names, names
    packed.extractall(tmp_path)
    att = np.load(tmp_path / "attention" / "attention.npz")["attention"]
    for layer in range(att.shape[0]):
        assert_near(att[layer], HOOKS[f"trained.blocks.{layer}.attn.hook_pattern"][0],
                    f"layer {layer}")
    lens = np.load(tmp_path / "lens" / "lens.npz")
    assert_near(lens["next_token_prob"][:, :-1], CAUSES["next_token_prob"], "lens")
    assert post(server, "/api/export", {"text": ""})[0] == 400


def test_generate_greedy_equals_hugging_face():
    server = start(FIXTURES / "tiny-gpt2" / "model.safetensors")
    try:
        status, got = post(server, "/api/generate", {"text": "<|endoftext|>", "n": 20,
                                                     "temperature": 0, "seed": 1})
        assert status == 200, got
        assert got["text"] == "<|endoftext|>" + str(REFERENCE["greedy0_output_text"])
        bad, err = post(server, "/api/generate", {"text": "Hi", "n": 0})
        assert bad == 400 and "n" in err["error"]
    finally:
        server.shutdown()
        server.server_close()


LONG = "word " * 200  # over the trained fixture's context of 64 tokens


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/api/run", {"text": ""}, 400, "non-empty"),
    ("/api/run", {"txt": "hi"}, 400, '"text"'),
    ("/api/run", {"text": LONG}, 400, "at most 64"),
    ("/api/run", [1, 2], 400, "JSON object"),
    ("/api/ablate", {"text": "a b", "heads": ["2.0"]}, 400, "no head 2.0"),
    ("/api/ablate", {"text": "a b", "heads": ["x"]}, 400, "LAYER.HEAD"),
    ("/api/ablate", {"text": "a b", "heads": "0.1"}, 400, "list"),
    ("/api/ablate", {"text": "a b", "heads": ["0.1"], "mean": "median"}, 400, "mean"),
    ("/api/patch", {"clean": "a b", "corrupt": "a", "answer": " a", "wrong": " b"}, 400,
     "same number"),
    ("/api/patch", {"clean": "a b", "corrupt": "a c", "answer": " John Mary", "wrong": " b"},
     400, "one token"),
    ("/api/nothing", {"text": "hi"}, 404, "no endpoint"),
])
def test_bad_requests_are_one_line_and_the_server_goes_on(server, path, body, status, fragment):
    got_status, got = post(server, path, body)
    assert got_status == status and fragment in got["error"], got
    assert "\n" not in got["error"] and "Traceback" not in got["error"]
    good, answer = post(server, "/api/run", {"text": "The day is young"})
    assert good == 200 and len(answer["tokens"]) == 4


def test_malformed_oversized_foreign_host_and_cross_origin_are_refused(server):
    status, got = post(server, "/api/run", None, raw=b'{"text": "unfinished')
    assert status == 400 and got["error"].startswith("malformed JSON")
    # a body said to be over 1 MB is refused before it is read (sending all of it would race
    # the server's early answer and closed connection)
    status, got = post(server, "/api/run", None, raw=b"{}",
                       headers={"Content-Length": str(serve.MAX_BODY + 1)})
    assert status == 400 and "at most" in got["error"]
    status, got = post(server, "/api/run", {"text": "hi"}, headers={"Host": "evil.example:80"})
    assert status == 403 and "answers to" in got["error"]
    status, got = request(server, "GET", "/", headers={"Host": "evil.example"})
    assert status == 403
    status, got = post(server, "/api/run", {"text": "hi"},
                       headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in got["error"]
    port = server.server_address[1]
    status, got = post(server, "/api/run", {"text": "hi"},
                       headers={"Origin": f"http://localhost:{port}"})
    assert status == 200
    good, answer = post(server, "/api/run", {"text": "The day is young"})
    assert good == 200 and answer["tokens"][0] == "The"


def test_page_files_are_served_and_name_nothing_outside(server):
    for path, kind in (("/", b"<!doctype html>"), ("/workbench.js", b""), ("/workbench.css", b"")):
        status, body = request(server, "GET", path)
        assert status == 200 and body.startswith(kind), path
        text = body.decode()
        # no script, style, font or picture from another site: every URL is this server's
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), path
        assert "cdn" not in text.lower(), path
    status, info = request(server, "GET", "/api/info")
    assert status == 200 and info["layers"] == 2 and info["heads"] == 2


def rss_kb() -> int:
    """This process's resident memory, after the garbage collector and glibc's malloc_trim: the
    memory freed but kept by the allocator's per-thread arenas (a server thread per request)
    moves the plain figure by a third from one burst to the next, with no trend."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the plain figure
        pass
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def test_mixed_requests_leave_the_server_serving_and_its_memory_flat(server):
    """200 requests, good and bad in turn, from 4 threads: every good answer is right, every bad
    one a 400 or 403, and the process's memory stays within 10 % of where it was after 100 such
    requests (the first ones grow it for good: the buffers of the compiled pass, tinygrad's
    caches of freed buffers)."""
    port = server.server_address[1]
    kinds = [
        ("/api/run", {"text": ROMEO}, {}, 200),
        ("/api/run", None, {}, 400),  # raw: malformed
        ("/api/ablate", {"text": ROMEO, "heads": ["0.1", "1.0"]}, {}, 200),
        ("/api/run", {"text": "hi"}, {"Host": f"rebound.example:{port}"}, 403),
        ("/api/ablate", {"text": ROMEO, "heads": ["9.9"]}, {}, 400),
    ]
    failures = []

    def worker(first: int, n: int):
        for i in range(first, n, 4):
            path, body, headers, want = kinds[i % len(kinds)]
            raw = b'{"text": ' if body is None else None
            status, got = post(server, path, body, headers=headers, raw=raw)
            if status != want:
                failures.append((i, status, got))
            elif want == 200:
                right = CAUSES["base_loss" if path == "/api/run" else "zero_0.1_1.0_loss"]
                if abs(got["loss"] - right) > 1e-5:
                    failures.append((i, "wrong loss", path, got["loss"]))

    def burst(n: int):
        threads = [threading.Thread(target=worker, args=(k, n)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    burst(100)
    before = rss_kb()
    started = time.monotonic()
    burst(200)
    assert time.monotonic() - started < 120
    assert failures == []
    assert rss_kb() <= before * 1.10, (before, rss_kb())


# ---------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                    reason="no chromium here (apt-get install chromium); CI installs it")
def test_page_shows_tokens_prediction_and_knocked_out_heads_in_chromium(server, tmp_path):
    """The page loaded with a text and a knocked-out head in its URL renders the tokens, the top
    prediction of the ablated pass, the heads marked, and the lens; it fetched from this
    server only (the page's Content-Security-Policy allows nothing else)."""
    port = server.server_address[1]
    state = urllib.parse.urlencode({"text": ROMEO, "knock": "0.1,1.0"})
    url = f"http://127.0.0.1:{port}/#{state}"
    run = dump_dom(url, tmp_path, "--virtual-time-budget=20000", "--enable-logging=stderr")
    dom = run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
    _, ablated = post(server, "/api/ablate", {"text": ROMEO, "heads": ["0.1", "1.0"]})
    tokens = re.findall(r'<span class="tok[^"]*" data-i="\d+"[^>]*>([^<]*)</span>', dom)
    assert tokens == [t.replace("&", "&amp;").replace("<", "&lt;") for t in ablated["tokens"]]
    top = re.search(r'<li class="next"[^>]*><span class="ntok">([^<]*)</span>', dom)
    assert top and top.group(1) == ablated["next"][0]["token"], dom[:3000]
    knocked = sorted(re.findall(r'<canvas class="thumb knocked[^"]*" data-head="(\d\.\d)"', dom))
    assert knocked == ["0.1", "1.0"]
    assert f'id="loss">{ablated["loss"]:.4f}' in dom
    assert dom.count('class="lens-cell') == 3 * 22
    assert re.search(r'id="status"[^>]*>ready<', dom)
    # no script error reached the console (Chromium logs them to stderr with this flag)
    assert "Uncaught" not in run.stderr and "Refused to" not in run.stderr, run.stderr[-2000:]



NODE = shutil.which("node")


@pytest.mark.skipif(not NODE, reason="no node here (apt-get install nodejs)")
def test_page_reads_the_patching_scan_as_it_streams(server, tmp_path):
    """The page's own patchLines (web/workbench.js), run by Node (whose fetch is the browser's),
    reads the scan's progress lines and then its answer: Hugging Face's logit differences.
    (Headless Chromium's --dump-dom with a virtual time budget ends before a streamed body.)"""
    port = server.server_address[1]
    js = (REPO / "web" / "workbench.js").read_text()
    code = js[js.index("async function patchLines("):js.index("async function patch() {")]
    code = code.replace('fetch("/api/patch"', f'fetch("http://127.0.0.1:{port}/api/patch"')
    script = tmp_path / "scan.mjs"
    script.write_text(code + f"""
const got = await patchLines({json.dumps(PAIR)}, (p) => console.log(JSON.stringify(p)));
console.log(JSON.stringify(got.patching));
""")
    run = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    *steps, exact = [json.loads(line) for line in run.stdout.splitlines()]
    assert [s["done"] for s in steps] == list(range(1, steps[0]["total"] + 1))
    for key in ("clean_logit_diff", "corrupt_logit_diff", "resid_pre"):
        assert_near(exact[key], PATCH[f"trained.{key}"], key)

# ---------------------------------------------------------------------------------------------
# The command lines, as true subprocesses
# ---------------------------------------------------------------------------------------------


def serving(args: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `python ARGS` and wait for its "serving ... at URL" line -> (process, URL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError(f"no URL from {args}: {proc.stderr.read()[-2000:]}")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    """Ctrl-C: -> (exit status, stderr)."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def post_url(url: str, path: str, body) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


def test_gpt_serve_as_a_subprocess_answers_and_stops_on_ctrl_c():
    proc, url = serving(["gpt.py", "--serve", "--port", "0", "--weights", str(TRAINED)])
    try:
        status, got = post_url(url, "/api/run", {"text": ROMEO})
        assert status == 200 and got["ids"] == CAUSES["ids"].tolist()
        assert_near(got["loss"], CAUSES["base_loss"], "loss")
    finally:
        code, err = stop(proc)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted", err


def test_serve_flags_are_checked():
    from conftest import run_main

    run = run_main(gpt.main, "--port", "8000", "-p", "hi")
    assert run.returncode == 2 and "--port goes with --serve" in run.stderr
    run = run_main(gpt.main, "--serve", "--port", "70000")
    assert run.returncode == 2 and run.stderr.startswith("error: argument --port")
    from train import main as train_main

    run = run_main(train_main, "--host", "0.0.0.0")
    assert run.returncode == 2 and "--host goes with --serve" in run.stderr
    run = run_main(train_main, "--serve", "--task", "classify")
    assert run.returncode == 2 and "--serve reads a decoder-only model" in run.stderr


def test_transformer_serve_reads_the_toy_checkpoint(cli_checkpoint):
    proc, url = serving(["transformer.py", "--serve", "--port", "0", "--task", "reverse",
                         "--out", str(cli_checkpoint)])
    try:
        status, got = post_url(url, "/api/run", {"text": "123>3"})
        assert status == 200 and got["tokens"] == ["1", "2", "3", ">", "3"]
        # the next-token probabilities are the softmax of the model's own logits (NumPy)
        from tinygrad import Tensor

        from train import load_checkpoint
        model = load_checkpoint(cli_checkpoint)[0]
        logits = model(Tensor(np.array([[1, 2, 3, 10, 3]], np.int32))).numpy()[0, -1]
        p = softmax(logits)
        assert_near([n["prob"] for n in got["next"]], np.sort(p)[::-1][:10], "next probs")
        bad, err = post_url(url, "/api/run", {"text": "12a"})
        assert bad == 400 and "'a' is no token" in err["error"]
    finally:
        code, err = stop(proc)
    assert code == 130, err
