"""The live workbench: one loaded model behind a local web page and a JSON API (issue 32).

    python gpt.py --serve                          # GPT-2 124M (or --weights FILE), port 8000
    python transformer.py --serve                  # the saved toy checkpoint of --task
    curl -s localhost:8000/api/run -d '{"text": "The cat sat on the mat"}'

The model is loaded once and its passes warmed before the URL is printed. Every endpoint is a
thin layer over the lab's own functions: heads.attention_maps, heads.lens_read and
heads.KnockOut for /api/run and /api/ablate, patching.py for /api/patch, generate.generate for
/api/generate. The page (web/workbench.html, .js, .css) is served from the repository: nothing
comes from another site. docs/serve.md lists the endpoints with a curl example each.

The standard library's ThreadingHTTPServer does the HTTP; one lock lets one computation run at a
time (tinygrad is not thread-safe), the others wait their turn. It listens on 127.0.0.1, refuses
a request whose Host is not its own (DNS rebinding) and a cross-origin POST.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

import flags
import heads
import patching
from flags import UserError

WEB = Path(__file__).with_name("web")  # the page's own files
FILES = {"/": ("workbench.html", "text/html; charset=utf-8"),
         "/workbench.js": ("workbench.js", "text/javascript; charset=utf-8"),
         "/workbench.css": ("workbench.css", "text/css; charset=utf-8")}
MAX_BODY = 1 << 20  # 1 MB: a request body beyond it is refused unread
TOP = 10  # next-token candidates shown
MAX_NEW = 256  # tokens one /api/generate may ask for
PASS_ROWS = 16  # the pass is compiled for texts of 1-16, 17-32, ... tokens
LENS_KEPT = 4  # compiled lenses kept (Workbench.lens)
LENS_ROWS = 8  # the lens is compiled for texts of 1-8, 9-16, ... tokens
LENS_ELEMENTS = 1 << 26  # the lens reads at most this many logits (256 MB) at once (groups)
PLAIN_KEPT = 8  # the plain lenses of this many texts are kept (Workbench.read_lens)
DIGITS = 5  # attention and probabilities travel rounded to 5 decimals
FIRST_PORT, PORTS_TRIED = 8000, 20  # no --port: 8000, else the next free one


class Cancelled(Exception):
    """A patching scan stopped by /api/patch/cancel or by its page going away."""


class Vocab:
    """How the workbench turns text into ids and back, for any model: encode(text) -> ids,
    label(id) -> a readable token (heads.readable), decode(ids) -> text, and one(text, what) ->
    the id of text that must be exactly one token."""

    def __init__(self, encode, label, decode):
        self.encode, self.label, self.decode = encode, label, decode

    def one(self, text: str, what: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            pieces = " + ".join(repr(self.decode([i])) for i in ids) or "no token"
            raise UserError(f"{what} {text!r} must be one token; it is {pieces}")
        return int(ids[0])


def gpt2_vocab(enc) -> Vocab:
    """GPT-2's byte-pair tokenizer (tiktoken), <|endoftext|> allowed in the text."""
    return Vocab(lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}),
                 lambda i: heads.readable(enc.decode_single_token_bytes(int(i))),
                 lambda ids: enc.decode([int(i) for i in ids]))


def task_vocab(task, vocab_size: int) -> Vocab:
    """A toy task's tokens (task.token): a character each where every token is one character
    (Reverse's digits and '>', Shakespeare's letters), else words between spaces."""
    raw = getattr(task, "chars", None)  # Shakespeare: the characters themselves
    labels = [raw[i] if raw is not None else task.token(i) for i in range(vocab_size)]
    lookup = {label: i for i, label in enumerate(labels)}
    by_char = all(len(label) == 1 for label in labels)

    def encode(text: str) -> list[int]:
        pieces = list(text) if by_char else text.split()
        unknown = [p for p in pieces if p not in lookup]
        if unknown:
            shown = " ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
            raise UserError(f"{unknown[0]!r} is no token of task {task.name!r} (its tokens: "
                            f"{shown})")
        return [lookup[p] for p in pieces]

    join = "" if by_char else " "
    return Vocab(encode, lambda i: heads.readable(labels[int(i)]),
                 lambda ids: join.join(labels[int(i)] for i in ids))


def rounded(a) -> list:
    return np.round(np.asarray(a, dtype=np.float64), DIGITS).tolist()


def parse_head_names(names, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """["L.H", ...] -> [(L, H), ...] through heads.parse_heads, its error without the flag."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError('"heads" must be a list of "LAYER.HEAD" strings, e.g. ["0.1"]')
    if not names:
        return []
    try:
        return heads.parse_heads(",".join(names), n_layer, n_head)
    except UserError as e:
        raise UserError(str(e).replace("--heads: ", "").replace("--heads ", "heads ")) from None


def shared_kernel_cache():
    """tinygrad keeps compiled kernels in a SQLite file through one connection, which SQLite lets
    only the thread that opened it use; the workbench computes on the server's threads (one at a
    time, under its lock), so the connection is opened again as one that any thread may use."""
    from tinygrad import helpers

    if getattr(helpers, "_db_connection", None) is not None and getattr(
            helpers._db_connection, "tinygpt_shared", False):
        return
    os.makedirs(os.path.dirname(helpers.CACHEDB), exist_ok=True)
    conn = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE",
                           check_same_thread=False, factory=SharedConnection)
    conn.execute("PRAGMA synchronous=NORMAL")
    helpers._db_connection = conn


class SharedConnection(sqlite3.Connection):
    tinygpt_shared = True  # marks the connection shared_kernel_cache opened


class Workbench:
    """A model and its vocabulary, and what each endpoint computes, under one lock."""

    def __init__(self, model, vocab: Vocab, title: str, example: str = ""):
        self.model, self.vocab, self.title, self.example = model, vocab, title, example
        self.lock = threading.Lock()
        # set by cancel() (POST /api/patch/cancel, outside the lock): the running scan stops
        self.cancelled, self.scanning = threading.Event(), False
        self.jits, self.knockouts = {}, {}  # see compiled; one heads.KnockOut per kind of mean
        self.plain_lens = {}  # (ids, size) -> the lens of the plain pass (read_lens)
        shared_kernel_cache()
        c = model.config
        # right-padding to generate's buckets lets texts of other lengths reuse the kernels;
        # safe where the causal mask hides the padding and no id means padding (as heads.py)
        self.pads = c.causal and c.pad_id is None

    def groups(self, size: int) -> tuple[list[int], int]:
        """How the lens reads the streams of compiled(size)'s pass: in groups of g blocks, one
        product with the unembedding each (a product per block read GPT-2's 154 MB unembedding
        12 times over, and a short text's lens is that read). Two halves of the model; fewer
        blocks at once where the text is long (LENS_ELEMENTS). -> (where each group
        starts, g): the groups are all as large and end at the last block, the first one
        overlapping the next where g does not divide n_layer."""
        L, V = self.model.config.n_layer, self.model.config.vocab_size
        g = max(1, min(-(-L // 2), LENS_ELEMENTS // (size * V)))
        return [max(0, start) for start in range(L - g, -g, -g)], g

    def compiled(self, size: int, mean):
        """The pass of /api/run and /api/ablate on ids (1, size): logits, every head's attention
        (1, L, H, size, size) and the stream before each block for the lens, in the groups of
        groups(size) (each (g, size, C)), from one pass, compiled once per length and kind of
        knock-out by TinyJit (runtime.jit_at_once) and replayed: scheduling GPT-2's pass anew
        took longer than running it. The knock-out masks are buffers written in place
        (heads.KnockOut), so a replay knocks out the heads of now."""
        from tinygrad import Tensor

        from runtime import jit_at_once

        key = (size, mean)
        if key not in self.jits:
            model = self.model
            patterns = [f"blocks.{layer}.attn.hook_pattern"
                        for layer in range(model.config.n_layer)]
            points = heads.lens_points(model)[:-1]  # the last reading is the logits themselves
            starts, g = self.groups(size)

            def passes(x):
                out, cache = model.run_with_cache(x, patterns + points)
                att = Tensor.stack(*[cache[name] for name in patterns], dim=1).realize()
                streams = [Tensor.stack(*[cache[name][0] for name in points[s:s + g]]).realize()
                           for s in starts]  # (g, size, C) each
                return out, att, *streams

            self.jits[key] = jit_at_once(passes)
        return self.jits[key]

    def lens(self, size: int, rows: int):
        """The logit lens (heads.lens_read) over the first rows positions of compiled(size)'s
        pass: a group of blocks' streams (g, size, C) read through the final LayerNorm and the
        unembedding, and the logits (1, size, V) as they are; two TinyJits, compiled once per
        (size, rows) and replayed, the first once per group. rows is the text's length rounded
        up to LENS_ROWS, not the pass's padded length: the lens's products with the unembedding
        are most of a request, and padding 40 tokens to 64 would make them 60 % more."""
        from runtime import jit_at_once

        key = ("lens", size, rows)
        if key not in self.jits:
            # each keeps its readings' buffers (g x rows x V floats): the oldest go
            kept = [k for k in self.jits if k[0] == "lens"]
            for old in kept[:max(0, len(kept) - LENS_KEPT + 1)]:
                del self.jits[old]
            model = self.model
            read = lambda z, next_ids: tuple(t.realize() for t in heads.lens_read(z, next_ids))
            self.jits[key] = (jit_at_once(lambda x, nxt: read(model.unembed(x[:, :rows]), nxt)),
                              jit_at_once(lambda logits, nxt: read(logits[:, :rows], nxt)))
        return self.jits[key]

    def read_lens(self, ids: np.ndarray, size: int, streams, logits, knocked) -> list:
        """The lens of compiled(size)'s pass on ids: [top ids, their probabilities, the next
        token's] (L + 1, T) each. The blocks up to the first knocked-out head's read what they
        read without it: a group of those is taken from the plain pass of the same text when
        its lens was read (the page reads /api/run before each /api/ablate), so knocking out a
        head in the model's second half reads half the lens."""
        from tinygrad import Tensor

        from runtime import host_output

        T, L = len(ids), self.model.config.n_layer
        rows = min(size, -(-T // LENS_ROWS) * LENS_ROWS)
        following = np.zeros(rows, dtype=np.int32)  # each position's next token
        following[:T - 1] = ids[1:]
        following = Tensor(following)
        group, last = self.lens(size, rows)
        key = (ids.tobytes(), size)
        plain = self.plain_lens.get(key) if knocked else None
        first = min(layer for layer, _ in knocked) + 1 if knocked else 0  # the first block moved
        read = lambda found: [host_output(t)[:, :T] for t in found]  # 3 x (n, T)
        lens = [np.zeros((L + 1, T), np.int64), np.zeros((L + 1, T)), np.zeros((L + 1, T))]
        starts, g = self.groups(size)
        for start, stream in zip(starts, streams):
            if plain is not None and start + g <= first:  # the group before any knocked head
                parts = [part[start:start + g] for part in plain]
            else:
                parts = read(group(stream, following))
            for part, got in zip(lens, parts):
                part[start:start + g] = got
        for part, got in zip(lens, read(last(logits, following))):
            part[L:] = got
        if not knocked:
            self.plain_lens.pop(key, None)
            self.plain_lens[key] = lens  # the newest last
            while len(self.plain_lens) > PLAIN_KEPT:
                del self.plain_lens[next(iter(self.plain_lens))]
        return lens

    def info(self) -> dict:
        c = self.model.config
        return {"title": self.title, "layers": c.n_layer, "heads": c.n_head, "n_ctx": c.n_ctx,
                "example": self.example}

    def ids_of(self, text, what: str = "text") -> np.ndarray:
        if not isinstance(text, str) or not text:
            raise UserError(f'"{what}" must be a non-empty string')
        ids = self.vocab.encode(text)
        if not ids:
            raise UserError(f'"{what}" has no token')
        if len(ids) > self.model.config.n_ctx:
            raise UserError(f'"{what}" has {len(ids)} tokens; the model sees at most '
                            f"{self.model.config.n_ctx}")
        return np.asarray(ids, dtype=np.int32)

    def run(self, text, knocked=(), mean=None, views: bool = True) -> dict:
        """/api/run (knocked empty) and /api/ablate: the tokens, the next-token top 10, every
        head's attention, the logit lens and the mean next-token loss, with the heads in knocked
        replaced by zeros (mean None) or by their mean (heads.MEANS). views=False leaves out
        the attention and the lens (the lens's unembedding of every layer is most of the time):
        what the page's ablation scan asks for, which needs the loss alone."""
        from tinygrad import Tensor

        from generate import padded_length

        ids = self.ids_of(text)
        T = len(ids)
        # a mean over all positions would take in the padding: that one runs unpadded. Padded
        # to a multiple of PASS_ROWS, not to generate's power of two, where that is shorter: 40
        # tokens run as 48, not 64 (a compile per 16 lengths, once, for a quicker answer after)
        size = (min(padded_length(self.model, T), -(-T // PASS_ROWS) * PASS_ROWS)
                if self.pads and mean != "positions" else T)
        padded = np.zeros(size, dtype=np.int32)
        padded[:T] = ids
        with self.lock:
            ko = self.knockouts.get(mean) or self.knockouts.setdefault(
                mean, heads.KnockOut(self.model, mean))
            with ko:
                ko.knock(list(knocked))
                out, att, *streams = self.compiled(size, mean)(Tensor(padded[None]))
                logits = out.numpy()[0, :T].astype(np.float64)
                if views:
                    att = att.numpy()[0, :, :, :T, :T]
                    lens_ids, lens_probs, next_prob = self.read_lens(ids, size, streams, out,
                                                                     knocked)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))  # (T, V)
        last = np.exp(logp[-1])
        top = heads.top_k(last, TOP)
        loss = float(-logp[np.arange(T - 1), ids[1:]].mean()) if T > 1 else None
        answer = {
            "tokens": [self.vocab.label(i) for i in ids], "ids": ids.tolist(),
            "next": [{"token": self.vocab.label(i), "id": int(i), "prob": float(last[i])}
                     for i in top],
            "loss": loss, "heads": [f"{layer}.{h}" for layer, h in knocked], "mean": mean,
        }
        if not views:
            return answer
        next_prob = rounded(next_prob)
        for row in next_prob:
            row[-1] = None  # the last position has no next token
        return {
            **answer, "attention": rounded(att),
            "lens": {"tokens": [[self.vocab.label(i) for i in row] for row in lens_ids],
                     "ids": lens_ids.tolist(), "probs": rounded(lens_probs),
                     "next_prob": next_prob},
        }

    def ablate(self, text, names, mean=False, views=True) -> dict:
        c = self.model.config
        knocked = parse_head_names(names, c.n_layer, c.n_head)
        if mean is False or mean is None:
            how = None
        elif mean is True:
            how = "causal"  # as gpt.py's --mean with no value
        elif mean in ("causal", "positions"):
            how = mean
        else:
            raise UserError('"mean" must be false, true, "causal" or "positions"')
        if not isinstance(views, bool):
            raise UserError('"views" must be true or false')
        return self.run(text, knocked, how, views)

    def patch(self, clean, corrupt, answer, wrong, progress=None, grids=None) -> dict:
        """/api/patch: what patching.npz, attribution.npz and dla.npz hold (patch_and_write,
        write_dla), the cells where the two disagree by more than 0.1, and the tokens.
        progress(done, total, step): called after each patched batch (step: its hook point),
        after attribution patching and after the DLA; cancel() from another thread, or a
        progress that raises (the page went away), stops the scan with Cancelled."""
        clean_ids, corrupt_ids = self.ids_of(clean, "clean"), self.ids_of(corrupt, "corrupt")
        if not isinstance(answer, str) or not isinstance(wrong, str):
            raise UserError('"answer" and "wrong" must be strings, one token each')
        a, w = self.vocab.one(answer, "answer"), self.vocab.one(wrong, "wrong")
        patching.check_pair(self.model, clean_ids, corrupt_ids)
        every = [k for k in patching.GRID_KEYS
                 if k != "mlp_out" or "mlp_out" in patching.grid_points(self.model)]
        if grids is not None and (not isinstance(grids, list) or not grids
                                  or any(g not in every for g in grids)):
            raise UserError(f'"grids" must be a list of some of {", ".join(every)}')
        extra = 2  # attribution patching and the DLA, one step each

        seen = {"total": 0}  # activation_patching's number of batches

        def step(done, total, name):
            seen["total"] = total
            if self.cancelled.is_set():
                raise Cancelled("the patching scan was cancelled")
            if progress is not None:
                progress(done, total + extra, name)

        with self.lock:
            self.cancelled.clear()  # a cancel sent before this scan began is not for it
            self.scanning = True
            try:
                exact = patching.activation_patching(self.model, clean_ids, corrupt_ids, a, w,
                                                     progress=step, kinds=grids)
                total = seen["total"]
                estimate = patching.attribution_patching(self.model, clean_ids, corrupt_ids,
                                                         a, w)
                step(total + 1, total, "attribution")
                dla = patching.direct_logit_attribution(self.model, clean_ids, a, w)
                step(total + 2, total, "dla")
            finally:
                self.scanning = False
        corrupt_diff = exact["corrupt_logit_diff"]
        keys = [k for k in patching.GRID_KEYS if k in exact]
        return {
            "tokens": [self.vocab.label(i) for i in corrupt_ids],
            "patching": {"clean_logit_diff": exact["clean_logit_diff"],
                         "corrupt_logit_diff": corrupt_diff,
                         **{k: exact[k].tolist() for k in keys}},
            "attribution": {"clean_logit_diff": exact["clean_logit_diff"],
                            "corrupt_logit_diff": corrupt_diff,
                            **{k: (corrupt_diff + estimate[k]).tolist() for k in keys}},
            "dla": {k: (np.asarray(v).tolist()) for k, v in dla.items()},
            "disagreements": patching.disagreements(exact, estimate, 0.1),
        }

    def export(self, text) -> bytes:
        """/api/export: a zip of what `gpt.py --attention TEXT` and `--logit-lens TEXT` write
        (heads.inspect_model, heads.write_lens: attention.npz, heads.png, scores.png,
        attention.html, lens.npz, lens.png), written by those functions into a folder of its
        own and packed."""
        import tempfile
        import zipfile
        from io import BytesIO

        ids = self.ids_of(text)
        labels = [self.vocab.label(i) for i in ids]
        buffer = BytesIO()
        with tempfile.TemporaryDirectory(prefix="workbench-") as folder, self.lock:
            root = Path(folder)
            heads.inspect_model(self.model, ids, labels, root / "attention", self.title)
            lens = heads.logit_lens(self.model, ids)
            one = lambda i: self.vocab.decode([int(i)])  # write_lens names one token at a time
            heads.write_lens(root / "lens", lens, labels, one, self.title,
                             heads.parse_window(None, len(ids)))
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
                for path in sorted(root.rglob("*")):
                    if path.is_file():
                        packed.write(path, path.relative_to(root).as_posix())
        return buffer.getvalue()

    def cancel(self) -> dict:
        """/api/patch/cancel: stop the patching scan now running, if any (it answers
        {"cancelled": true} in its stream, or 400 without one)."""
        running = self.scanning
        if running:
            self.cancelled.set()
        return {"cancelled": running}

    def generate(self, text, n=20, temperature=0.8, seed=0) -> dict:
        from generate import generate

        ids = self.ids_of(text)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW:
            raise UserError(f'"n" must be a whole number from 1 to {MAX_NEW}')
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                or not 0 <= temperature <= 100):
            raise UserError('"temperature" must be a number from 0 to 100')
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UserError('"seed" must be a whole number >= 0')
        rng = np.random.default_rng(seed)
        with self.lock:
            new = [int(t[0]) for t in generate(self.model, ids[None], n, temperature, rng=rng)]
        return {"text": self.vocab.decode([*ids.tolist(), *new]),
                "new": self.vocab.decode(new)}

    def warm(self):
        """Compile what a first request would: a pass, an ablated pass, a short generation."""
        text = self.example or self.vocab.decode([0, 0])
        self.run(text)
        self.ablate(text, ["0.0"])


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

ENDPOINTS = {
    "/api/run": lambda wb, q: wb.run(q.get("text")),
    "/api/ablate": lambda wb, q: wb.ablate(q.get("text"), q.get("heads", []),
                                           q.get("mean", False), q.get("views", True)),
    "/api/patch": lambda wb, q: wb.patch(q.get("clean"), q.get("corrupt"), q.get("answer"),
                                         q.get("wrong"), grids=q.get("grids")),
    "/api/patch/cancel": lambda wb, q: wb.cancel(),
    "/api/export": lambda wb, q: wb.export(q.get("text")),
    "/api/generate": lambda wb, q: wb.generate(q.get("text"), q.get("n", 20),
                                               q.get("temperature", 0.8), q.get("seed", 0)),
}


class Handler(BaseHTTPRequestHandler):
    """GET: the page's files and /api/info; POST: the endpoints. The server holds workbench,
    hosts (the Host values it answers to) and quiet (no access log)."""

    server_version = "tinygpt-workbench"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def send(self, status: int, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page may load its own files only, and talk to this server only
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj):
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
        self.send(status, body, "application/json; charset=utf-8")

    def error(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        self.send_json(status, {"error": " ".join(str(message).split())})  # one line

    def host_ok(self) -> bool:
        """The Host header names this server (a rebinding name would not)."""
        if self.headers.get("Host", "") not in self.server.hosts:
            self.error("this server answers to " + " or ".join(sorted(self.server.hosts)),
                       HTTPStatus.FORBIDDEN)
            return False
        return True

    def do_GET(self):
        if not self.host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/info":
            return self.send_json(200, self.server.workbench.info())
        if path not in FILES:
            return self.error(f"no page {path}", HTTPStatus.NOT_FOUND)
        name, kind = FILES[path]
        self.send(200, (WEB / name).read_bytes(), kind)

    def do_POST(self):
        if not self.host_ok():
            return
        origin = self.headers.get("Origin")
        if origin is not None and origin not in {f"http://{h}" for h in self.server.hosts}:
            return self.error(f"cross-origin request from {origin} refused",
                              HTTPStatus.FORBIDDEN)
        endpoint = ENDPOINTS.get(self.path)
        if endpoint is None:
            return self.error(f"no endpoint {self.path}; POST to {', '.join(ENDPOINTS)}",
                              HTTPStatus.NOT_FOUND)
        try:
            size = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_BODY:
            self.close_connection = True  # the body is left unread
            return self.error(f"the body must be JSON of at most {MAX_BODY} bytes")
        try:
            query = json.loads(self.rfile.read(size) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            return self.error(f"malformed JSON: {e}")
        if not isinstance(query, dict):
            return self.error("the body must be a JSON object")
        if self.path == "/api/patch" and query.get("progress", False) is not False:
            if query["progress"] is not True:
                return self.error('"progress" must be true or false')
            return self.stream_patch(query)
        try:
            answer = endpoint(self.server.workbench, query)
        except UserError as e:
            return self.error(e)
        except Exception as e:  # a bug, not the user's: said in one line, and serving goes on
            print(f"error in {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
            return self.send_json(500, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
        if isinstance(answer, bytes):  # /api/export's zip
            return self.send(200, answer, "application/zip")
        self.send_json(200, answer)


    def stream_patch(self, query: dict):
        """/api/patch with "progress": true: JSON lines in a chunked answer, one
        {"done", "total", "step"} after each patched batch, then the answer of /api/patch, or
        {"cancelled": true} (POST /api/patch/cancel, or the page closed the connection), or
        {"error"}. A mistake found before the scan begins is a 400 as anywhere."""
        started = []

        def line(obj):
            if not started:  # the headers go with the first line, once the request is valid
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                started.append(True)
            data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode() + b"\n"
            # a page gone away makes this write fail, which stops the scan (Cancelled)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def progress(done, total, step):
            try:
                line({"done": done, "total": total, "step": step})
            except OSError as e:
                raise Cancelled("the page closed the connection") from e

        try:
            answer = self.server.workbench.patch(query.get("clean"), query.get("corrupt"),
                                                 query.get("answer"), query.get("wrong"),
                                                 progress, query.get("grids"))
        except UserError as e:
            if not started:
                return self.error(e)
            answer = {"error": " ".join(str(e).split())}
        except Cancelled:
            answer = {"cancelled": True}
        except Exception as e:  # a bug: one line, and serving goes on
            print(f"error in {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
            if not started:
                return self.send_json(500, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
            answer = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        try:
            line(answer)
            self.wfile.write(b"0\r\n\r\n")  # the chunked answer's end
        except OSError:
            self.close_connection = True  # the page went away; nothing to tell it


def make_server(workbench: Workbench, host: str = "127.0.0.1", port: int | None = None,
                quiet: bool = True) -> ThreadingHTTPServer:
    """A server bound to host and port (None: FIRST_PORT or the next free one; 0: any free
    one), not yet serving. -> the server; server.url is its address."""
    ports = range(FIRST_PORT, FIRST_PORT + PORTS_TRIED) if port is None else [port]
    for p in ports:
        try:
            server = ThreadingHTTPServer((host, p), Handler)
            break
        except OSError as e:
            last = e
    else:
        where = (f"ports {ports[0]}-{ports[-1]} are" if port is None else f"port {port} is")
        raise UserError(f"{where} not free on {host} ({last.strerror}); pick one with --port")
    server.daemon_threads = True
    server.workbench, server.quiet = workbench, quiet
    bound = server.server_address[1]
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    server.hosts = {f"{name}:{bound}" for name in names}
    server.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{bound}/"
    return server


def serve(workbench: Workbench, host: str = "127.0.0.1", port: int | None = None, log=print):
    """Warm the model, print the URL, serve until Ctrl-C (which flags.run turns into one line
    and exit 130)."""
    if host not in ("127.0.0.1", "localhost"):
        log(f"warning: listening on {host}: anyone who can reach it can run the model")
    server = make_server(workbench, host, port, quiet=True)
    try:
        log("warming the model's passes...")
        workbench.warm()
        print(f"serving {workbench.title} at {server.url} (Ctrl-C stops it)", flush=True)
        server.service_actions = flags.check_interrupt  # each poll: a Ctrl-C a finalizer lost
        server.serve_forever()
    finally:
        server.server_close()

