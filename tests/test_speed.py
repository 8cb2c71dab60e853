"""Speed at the edges, checked without timing: the training Linear's own backward and the one-hot
token lookup against NumPy and tinygrad's gradient, the kept kernels read back in a new process,
the default backend, PoCL's silence, and bench.py's kernel profile. How fast it all is, is
bench.py's business (README, Speed)."""

import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PLAIN
from test_transformer import assert_clean_error, cli_process  # transformer.py, one error line
from tinygrad import Context, GlobalCounters, Tensor, TinyJit

import bench
import gpt
import runtime
from generate import generate
from transformer import Config, Transformer

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "tiny-gpt2" / "model.safetensors"


# 48 rows split into 24 partial sums of dW, 34 (= 2 x 17) into 17, 7 (prime) into 7, 13 x 17 into 17
@pytest.mark.parametrize("lead", [(3, 16), (2, 17), (7,), (13, 17)])
def test_training_linear_backward_matches_numpy(lead):
    rng = np.random.default_rng(5)
    n_in, n_out = 12, 20
    x = rng.normal(size=(*lead, n_in)).astype(np.float32)
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    b = rng.normal(size=n_out).astype(np.float32)
    g = rng.normal(size=(*lead, n_out)).astype(np.float32)  # the gradient arriving at y

    def run(how: str):
        X, W, B = Tensor(x), Tensor(w), Tensor(b)
        with Context(TRAINING=int(how != "plain")):
            if how == "split":  # matmul_backward: where cpu_matmul does not fit (sharded, GPUs)
                y = runtime.train_matmul(X.reshape(-1, n_in), W).reshape(*lead, n_out) + B
            else:  # on a CPU, cpu_matmul and its gradients' kernels
                y = X.linear(W.T, B)
            grads = (y * Tensor(g)).sum().gradient(X, W, B)
        return [t.numpy() for t in (y, *grads)]

    xs, gs = x.reshape(-1, n_in).astype(np.float64), g.reshape(-1, n_out).astype(np.float64)
    want = [x.astype(np.float64) @ w.T + b, g.astype(np.float64) @ w, gs.T @ xs, gs.sum(0)]
    plain = run("plain")  # TINYGPT_PLAIN=1: tinygrad's own gradient
    for how in ("split", "kernel"):
        for name, got, ref, other in zip(("y", "dx", "dW", "db"), run(how), want, plain):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{how} {name}")
            np.testing.assert_allclose(got, other, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{how} {name} vs plain")


def test_training_forward_and_gradients_equal_the_plain_ones():
    # the whole model: the one-hot token lookup, the tied output layer (W given as a view) and
    # every Linear take the training path with TRAINING=1; the numbers must not change
    config = Config(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=16)
    Tensor.manual_seed(3)
    model = Transformer(config)
    params = list(model.parameters().values())
    Tensor.realize(*params)
    rng = np.random.default_rng(3)
    idx = Tensor(rng.integers(0, 11, (3, 8), dtype=np.int32))
    y = Tensor(rng.integers(0, 11, (3, 8), dtype=np.int32))

    def run(training: int):
        with Context(TRAINING=training):
            loss = model(idx).sparse_categorical_crossentropy(y)
            return [t.numpy() for t in (loss, *loss.gradient(*params))]

    fast, plain = run(1), run(0)
    for name, a, b in zip(["loss", *model.parameters()], fast, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(plain[1]).max() > 0  # the token table does get a gradient


KEPT = """
import json, sys
import numpy as np
import tinygrad.codegen
from tinygrad import Device, Tensor
import runtime

Device[Device.DEFAULT]  # the CPU device generates 4 small programs of its own when it opens
generated = []
original = tinygrad.codegen.do_to_program
tinygrad.codegen.do_to_program = lambda *a: generated.append(1) or original(*a)
runtime.keep_kernels()
a = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
out = ((a @ a.T).relu() + 1).sum(1).numpy()
print(json.dumps({"generated": len(generated), "out": out.tolist()}))
"""


def run_kept(tmp_path: Path, **env) -> dict:
    env = {**os.environ, "DEV": "CPU", "PARALLEL": "0", "CACHEDB": str(tmp_path / "cache.db"),
           **env}  # PARALLEL=0: kernels are generated in this process, where they are counted
    run = subprocess.run([sys.executable, "-c", KEPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_helper_threads_run_every_chunk_at_once_and_hand_back_errors():
    cores = runtime._Cores()
    seen = {}

    def chunk(i: int):
        seen[i] = threading.get_ident()
        if i == 3:
            raise ValueError("chunk 3 failed")

    def slow(i: int):
        if i >= 10:
            time.sleep(0.05)
        chunk(i)

    cores.run(chunk, [[0], [1], [2]])
    assert sorted(seen) == [0, 1, 2] and cores.handed == 2
    assert seen[0] == threading.get_ident() and len(set(seen.values())) == 3  # one thread each
    with pytest.raises(ValueError, match="chunk 3 failed"):
        cores.run(chunk, [[0], [1], [2], [3]])
    assert sorted(seen) == [0, 1, 2, 3]  # the others ran all the same
    cores.run(chunk, [[5], [6]])  # and the helpers still serve
    assert seen[6] != threading.get_ident()
    with pytest.raises(ValueError, match="chunk 3 failed"):  # the caller's own chunk fails:
        cores.run(slow, [[3], [10]])
    assert 10 in seen  # its helper's chunk was still waited for, so no answer is left over
    cores.run(slow, [[4], [11]])
    assert 11 in seen


def test_kernel_chunks_on_all_cores_give_the_same_numbers():
    # NUM_CPU_THREADS=4: on any machine tinygrad splits these kernels into 4 chunks (core_id 0-3);
    # run serially first, then with three of them on helper threads, and compiled by TinyJit
    code = """if True:
    import numpy as np, runtime
    from tinygrad import Tensor, TinyJit
    rng = np.random.default_rng(0)
    a = rng.normal(size=(256, 192)).astype(np.float32)
    b = rng.normal(size=(192, 160)).astype(np.float32)
    c = rng.normal(size=(1024, 512)).astype(np.float32)
    step = lambda a, b, c: ((a @ b).realize(), (c.exp() * 2).sum(1).realize())
    serial = [t.numpy() for t in step(Tensor(a), Tensor(b), Tensor(c))]
    assert runtime._CORES.handed == 0
    runtime.run_on_all_cores()
    jit = TinyJit(step)
    for _ in range(3):
        both = [t.numpy() for t in jit(Tensor(a), Tensor(b), Tensor(c))]
        np.testing.assert_array_equal(both[0], serial[0])
        np.testing.assert_array_equal(both[1], serial[1])
    want = [a.astype(np.float64) @ b, 2 * np.exp(c.astype(np.float64)).sum(1)]
    for got, ref in zip(both, want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    print(runtime._CORES.handed)
    """
    env = {**os.environ, "DEV": "CPU", "NUM_CPU_THREADS": "4"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) >= 2 * 3 * 3  # two kernels, three runs, three helper chunks each


@pytest.mark.skipif(sys.platform != "linux" or not runtime._c_compiler(),
                    reason="the C helper threads are built on Linux with a C compiler")
def test_c_helper_threads_wake_from_sleep_and_serve_a_forked_child():
    # native_cores' helpers spin a while after each kernel, then sleep on a condition variable:
    # a kernel after a pause must wake them (a lost wake-up hangs, and the timeout fails it);
    # a forked child starts helpers of its own; 4 chunks per kernel (NUM_CPU_THREADS=4) on any
    # machine, so 3 go to helpers each time
    code = """if True:
    import os, time, numpy as np, runtime
    from tinygrad import Tensor
    assert runtime.native_cores() is not None
    runtime.run_on_all_cores()
    c = np.random.default_rng(0).normal(size=(1024, 512)).astype(np.float32)
    want = 2 * np.exp(c.astype(np.float64)).sum(1)
    check = lambda: np.testing.assert_allclose((Tensor(c).exp() * 2).sum(1).numpy(), want,
                                               rtol=1e-4)
    for pause in (0, 0.01, 0, 0.05, 0.001):
        check()
        time.sleep(pause)
    handed = runtime._CORES.handed
    pid = os.fork()
    if pid == 0:
        check()
        os._exit(0 if runtime._CORES.handed > handed else 3)
    assert os.waitpid(pid, 0)[1] == 0
    check()
    print(runtime._CORES.handed)
    """
    env = {**os.environ, "DEV": "CPU", "NUM_CPU_THREADS": "4"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) >= 6 * 3  # six runs of a 4-chunk kernel in the parent


def test_cpu_graph_replays_give_the_same_numbers_with_new_inputs_and_variables():
    # a TinyJit'd function replayed with fresh inputs and a new value of a bound Variable each
    # call: through tinygrad's own replay, then through CPUGraph; the same bits, kernel counts,
    # and NumPy's numbers (a buffer or variable left unpatched would repeat the capture's)
    code = """if True:
    import numpy as np, runtime
    from tinygrad import GlobalCounters, Tensor, TinyJit, Variable
    rng = np.random.default_rng(1)
    w = rng.normal(size=(192, 160)).astype(np.float32)
    W = Tensor(w).realize()
    xs = [rng.normal(size=(256, 192)).astype(np.float32) for _ in range(5)]
    ns = [256, 40, 100, 7, 256]

    def f(x, n):
        h = (x @ W).relu()  # (256, 160), split into 4 chunks
        return (h.shrink(((0, n), None)) * 2).sum(0).realize(), (h + 1).exp().realize()

    def run():
        jit, outs, counts = TinyJit(f), [], []
        for x, n in zip(xs, ns):
            before = GlobalCounters.kernel_count
            outs.append([t.numpy() for t in jit(Tensor(x), Variable("n", 1, 256).bind(n))])
            counts.append(GlobalCounters.kernel_count - before)
        return outs, counts

    runtime.run_on_all_cores()
    plain, plain_counts = run()
    runtime.batch_cpu_kernels()
    graphed, counts = run()
    assert runtime.cpu_graph().replays >= 3, runtime.cpu_graph().replays
    assert counts == plain_counts, (counts, plain_counts)
    for x, n, p, g in zip(xs, ns, plain, graphed):
        h = np.maximum(x.astype(np.float64) @ w, 0)
        for got, same, want in zip(g, p, [2 * h[:n].sum(0), np.exp(h + 1)]):
            np.testing.assert_array_equal(got, same)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    print(counts[-1])
    """
    env = {**os.environ, "DEV": "CPU", "NUM_CPU_THREADS": "4"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) == 3  # the matmul with its ReLU, the masked sum, the exp


# cpu_matmul's tiles are 3 rows (fewer for fewer rows) by 4 columns, its inner step 8 floats:
# sizes on and off them, with and without a bias, on one core (small) and split over the cores
# (large), batches (one W per entry) split by entries (6 >= the cores) or by rows (1 entry), and
# a row or two (decoding) split by the rows of W; W and b in float32 and in float16 (--half)
@pytest.mark.parametrize("w_dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead, M, N, K, bias", [
    ((), 1, 1, 8, False), ((), 7, 13, 24, True), ((), 3, 4, 8, True), ((), 5, 6, 13, True),
    ((), 200, 301, 96, True), ((), 97, 64, 517, False), ((2, 3), 7, 9, 20, False),
    ((2, 3), 130, 129, 64, False), ((1,), 300, 200, 64, False), ((), 1, 2303, 768, True),
    ((), 2, 1001, 301, True), ((1,), 1, 3, 5, True)])
def test_cpu_matmul_equals_numpy(lead, M, N, K, bias, w_dtype):
    rng = np.random.default_rng(M + N)
    shapes = ((*lead, M, K), (*lead, N, K), (N,))
    x, w, b = (rng.normal(size=s).astype(np.float32) for s in shapes)
    w, b = w.astype(w_dtype), b.astype(w_dtype)  # the float16 values are the ones multiplied
    got = runtime.cpu_matmul(Tensor(x), Tensor(w), Tensor(b) if bias else None).numpy()
    want = x.astype(np.float64) @ np.swapaxes(w, -1, -2).astype(np.float64) + (b if bias else 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_cpu_matmul_rows_do_not_depend_on_the_rows_beside_them():
    # bucketed prefill pads the rows: the real ones must come out the same to the bit, whether
    # 40 or 64 rows are multiplied, whichever core and tile each falls in, jitted or not
    rng = np.random.default_rng(2)
    x, w, b = (rng.normal(size=s).astype(np.float32) for s in ((64, 768), (300, 768), (300,)))
    W, B = Tensor(w).realize(), Tensor(b).realize()
    alone = runtime.cpu_matmul(Tensor(x[:40]), W, B).numpy()
    jit = TinyJit(lambda t: runtime.cpu_matmul(t, W, B).realize())
    for _ in range(3):
        padded = jit(Tensor(x)).numpy()
        np.testing.assert_array_equal(padded[:40], alone)
    np.testing.assert_allclose(padded, x.astype(np.float64) @ w.T + b, rtol=1e-5, atol=1e-4)
    # one row alone (a decode step) reads W row by row, its sums split another way: the same
    # within float32 rounding
    one = runtime.cpu_matmul(Tensor(x[5:6]), W, B).numpy()
    np.testing.assert_allclose(one, padded[5:6], rtol=1e-5, atol=1e-4)


def test_cpu_matmul_zeros_after_a_row_leave_it_as_it_was():
    # attention over padded keys: their weights are 0, so 14 keys and 16 (two zeros after)
    # must give the same bits, the 14 read as 8 and 6 with zeros after them
    rng = np.random.default_rng(3)
    att, v = rng.random((4, 5, 14)).astype(np.float32), rng.normal(size=(4, 9, 14))
    v = v.astype(np.float32)
    pad = ((0, 0), (0, 0), (0, 2))
    short = runtime.cpu_matmul(Tensor(att), Tensor(v)).numpy()
    padded = runtime.cpu_matmul(Tensor(np.pad(att, pad)), Tensor(np.pad(v, pad, constant_values=7)))
    np.testing.assert_array_equal(padded.numpy(), short)
    np.testing.assert_allclose(short, att.astype(np.float64) @ np.swapaxes(v, 1, 2), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("w_dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_cpu_matmul_reads_a_slice_of_the_cache_where_it_lies(w_dtype):
    # a prefill's q kᵀ against the keys it has just cached: each head's S rows lie in one
    # block of the cache (2, B, H, n_ctx, hs), the heads n_ctx rows apart. The product reads
    # them there, one kernel and no copy; att v's values, which it reads across memory, are
    # copied out first, as before
    rng = np.random.default_rng(5)
    cache = Tensor(rng.normal(size=(2, 2, 3, 40, 16)).astype(w_dtype)).realize()
    q, att = (Tensor(rng.normal(size=s).astype(np.float32)).realize()
              for s in ((2, 3, 7, 16), (2, 3, 7, 30)))
    k, v = cache[0, :, :, :30], cache[1, :, :, 2:32]  # (B, H, S, hs), v from its third row
    before = GlobalCounters.kernel_count
    scores = runtime.cpu_matmul(q, k).realize()
    assert GlobalCounters.kernel_count - before == 1  # the product alone
    out = runtime.cpu_matmul(att, v.transpose(-2, -1)).realize()  # (B, H, T, hs)
    assert GlobalCounters.kernel_count - before == 3  # vᵀ copied, then its product
    c = cache.numpy().astype(np.float64)
    want = q.numpy() @ np.swapaxes(c[0, :, :, :30], -1, -2)
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), att.numpy() @ c[1, :, :, 2:32], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead, per_entry", [((), False), ((2, 3), False), ((2, 3), True)],
                         ids=["rows", "batch-of-rows", "a-W-per-entry"])
def test_cpu_matmul_gradients_equal_numpy(monkeypatch, lead, per_entry):
    # linear is cpu_matmul, in training too; its gradients (training's, the lab's attributions)
    # are its own products of transposed copies: for x (6, 16), for x (2, 3, 6, 16) whose rows
    # all meet the one W, and for one W per entry of the batch (attention's q kᵀ per head)
    calls = []
    kernel = runtime.cpu_matmul
    monkeypatch.setattr(runtime, "cpu_matmul", lambda *a: calls.append(a[0].shape) or kernel(*a))
    rng = np.random.default_rng(4)
    shapes = ((*lead, 6, 16), ((*lead, 10, 16) if per_entry else (10, 16)), (10,),
              (*lead, 6, 10))
    x, w, b, g = (rng.normal(size=s).astype(np.float32) for s in shapes)
    X, W, B = Tensor(x), Tensor(w), Tensor(b)
    y = runtime.cpu_matmul(X, W, None if per_entry else B)
    grads = [t.numpy() for t in (y * Tensor(g)).sum().gradient(X, W)]
    assert len(calls) == 3  # the product, then dx and dW
    if per_entry:  # dW per entry: (..., 10, 16)
        want = [g @ w, np.swapaxes(g, -1, -2) @ x]
    else:
        g2, x2 = g.reshape(-1, 10), x.reshape(-1, 16)
        want = [g @ w, g2.T @ x2]
        db = (y * Tensor(g)).sum().gradient(B)[0].numpy()
        np.testing.assert_allclose(db, g2.sum(0), rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _permute(t, order):
    return t.permute(order) if isinstance(t, Tensor) else t.transpose(order)


# A view read in place: shrinks, permutes and reshapes that need no copy (q's slice of c_attn's
# output split into heads, a slice of the KV cache); axes that no longer lie in order in memory
# (after a permute, after a slice) cannot merge without a copy
@pytest.mark.parametrize("view, in_place", [
    (lambda t: t[1, :, 1:3], True),
    (lambda t: _permute(t.reshape(2, 3, 40)[:, :, 8:24].reshape(2, 3, 2, 8), (0, 2, 1, 3)), True),
    (lambda t: t.reshape(6, 40)[1:5].reshape(4, 4, 10)[:, 2:].reshape(4, 20), True),
    (lambda t: _permute(t, (0, 2, 1, 3)).reshape(2, 12, 10), False),
    (lambda t: t[..., :5].reshape(2, 3, 20), False)],
    ids=["slice", "heads", "merge", "permuted", "sliced"])
def test_strided_finds_the_elements_a_view_reads(view, in_place):
    a = np.arange(240, dtype=np.float32).reshape(2, 3, 4, 10)
    got = runtime.strided(view(Tensor(a)))
    if not in_place:
        assert got is None
        return
    base, shape, steps, offset = got
    want = view(a)
    assert tuple(shape) == want.shape and base.numel() == a.size
    where = offset + sum(i * step for i, step in zip(np.indices(want.shape), steps))
    np.testing.assert_array_equal(a.ravel()[where], want)


def test_a_product_reads_the_heads_outputs_where_they_lie():
    # attention's heads' outputs (B, H, 1, hs), transposed to (B, 1, H, hs) and flattened for
    # c_proj: in memory the same order, which tinygrad copies and in_order does not; the
    # numbers and the gradients through it still equal NumPy's
    rng = np.random.default_rng(6)
    xh, wh, w2, g = (rng.normal(size=s).astype(np.float32)
                     for s in ((2, 3, 1, 5), (2, 3, 4, 5), (6, 12), (2, 1, 6)))
    Xh, Wh, W2 = Tensor(xh), Tensor(wh), Tensor(w2)
    z = runtime.cpu_matmul(Xh, Wh).transpose(1, 2).reshape(2, 1, 12).contiguous()
    assert runtime.in_order(z) is not z
    y = runtime.cpu_matmul(z, W2)
    dxh, dw2 = (y * Tensor(g)).sum().gradient(Xh, W2)  # before y is realized, which ends its graph
    zn = np.swapaxes(xh @ np.swapaxes(wh, -1, -2), 1, 2).reshape(2, 1, 12)
    np.testing.assert_allclose(y.numpy(), zn @ w2.T, rtol=1e-5, atol=1e-5)
    dz = (g @ w2).reshape(2, 1, 3, 4).swapaxes(1, 2)  # (2, 3, 1, 4), back through the transpose
    np.testing.assert_allclose(dxh.numpy(), dz @ wh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw2.numpy(), g.reshape(2, 6).T @ zn.reshape(2, 12), rtol=1e-5,
                               atol=1e-5)


# A decoding step's q kᵀ and att v over the KV cache, read in place with the number of cached
# positions a variable: one compiled step replayed at every position, against NumPy; GPT-2's 12
# heads of 64, and a batch of 2 with 3 heads of 12 (an 8-float step with 4 left over)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, hs", [(1, 12, 64), (2, 3, 12)])
def test_cache_products_over_a_variable_count_equal_numpy(B, H, hs, dtype):
    from tinygrad import Variable

    rng = np.random.default_rng(B * H)
    n_ctx = 40
    cache = rng.normal(size=(2, B, H, n_ctx, hs)).astype(dtype)  # --half keeps float16 (its
    q, att = rng.normal(size=(B, H, 1, hs)), rng.random((B, H, 1, n_ctx))  # values multiplied)
    KV = Tensor(cache).realize()
    Q, A = (Tensor(a.astype(np.float32)).realize() for a in (q, att))
    pos = Variable("pos", 1, n_ctx - 1)

    def step(p):
        S = p + 1
        k, v = KV[0, :, :, :S], KV[1, :, :, :S]  # (B, H, S, hs), views of the cache
        scores = runtime.cache_matmul(Q, k)  # (B, H, 1, S)
        out = runtime.cache_matmul(A[:, :, :, :S], v.transpose(-2, -1))  # (B, H, 1, hs)
        assert scores is not None and out is not None, "not taken by the cache kernel"
        return scores.pad(((0, 0),) * 3 + ((0, n_ctx - S),)).contiguous().realize(), out.realize()

    jit = TinyJit(step)
    for p in (1, 3, 17, 39, 5, 39):  # captured on the second call, replayed from the third
        scores, out = (t.numpy() for t in jit(pos.bind(p)))
        S = p + 1
        want = q @ np.swapaxes(cache[0, :, :, :S], -1, -2).astype(np.float64)
        np.testing.assert_allclose(scores[..., :S], want, rtol=1e-5, atol=1e-5)
        want = att[..., :S] @ cache[1, :, :, :S].astype(np.float64)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(PLAIN, reason="TINYGPT_PLAIN=1: tinygrad's own products")
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_decoding_reads_the_kv_cache_in_place(monkeypatch, half):
    # each layer's q kᵀ and att v in a decode step (over a variable number of keys): the cache
    # kernel, not tinygrad's own product; the prefill's products (whole sizes) are not its own
    taken = []
    kernel = runtime.cache_matmul

    def spy(x, w):
        symbolic = not all(isinstance(s, int) for s in w.shape)
        return taken.append((symbolic, r := kernel(x, w))) or r

    monkeypatch.setattr(runtime, "cache_matmul", spy)
    model = gpt.load_gpt2("gpt2", FIXTURE, half=half)  # --half: a float16 cache
    list(generate(model, np.array([[464, 2068, 7586]], dtype=np.int32), 3))
    steps = [r for symbolic, r in taken if symbolic]
    assert len(steps) == 2 * model.config.n_layer and all(r is not None for r in steps)
    assert all(r is None for symbolic, r in taken if not symbolic)


def test_host_input_and_output_pass_a_jits_values_in_place():
    # a decode step's token written into the buffer the TinyJit reads, and its logits (a slice
    # of the padded output layer's row) read from the buffer it wrote: the values NumPy wants,
    # step after step, and the array handed back is the caller's own copy
    rng = np.random.default_rng(7)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    W = Tensor(w).realize()
    step = TinyJit(lambda tok: (W[tok.reshape(-1)] * 2)[:, :20].realize())  # (B, 20) of (B, 24)
    tok = None
    for ids in ([[3], [5]], [[7], [1]], [[63], [0]], [[2], [2]], [[9], [4]]):
        ids = np.array(ids, dtype=np.int32)
        held = tok
        tok = runtime.host_input(tok, ids)
        assert held is None or tok is held or PLAIN  # the same buffer, written again
        out = runtime.host_output(step(tok))
        np.testing.assert_array_equal(out, 2 * w[ids[:, 0], :20])
        out[:] = -1  # a copy: the next step's values do not depend on it
    assert step.cnt >= 3  # replayed, not traced each time


def test_host_output_reads_a_buffer_again_after_it_moved():
    # _host_view keeps the view it found for a tensor; the buffer freed and allocated anew (a
    # TinyJit's intermediates are) lies elsewhere, and the view must follow it
    t = Tensor(np.arange(12, dtype=np.float32)).realize()
    np.testing.assert_array_equal(runtime.host_output(t), np.arange(12))
    buf = t.uop.buffer
    if PLAIN:
        return
    from tinygrad.device import Buffer

    write = lambda b, v: np.frombuffer(b.as_memoryview(force_zero_copy=True), np.float32).fill(v)
    buf.deallocate()
    other = Buffer(buf.device, 12, buf.dtype).allocate()  # takes the memory freed, if reused
    buf.allocate()
    write(other, 7)
    write(buf, 5)
    np.testing.assert_array_equal(runtime.host_output(t), np.full(12, 5))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_host_memory_is_private_so_it_can_take_huge_pages():
    # Linux gives shared anonymous memory (Python's mmap default) huge pages only where
    # shmem_enabled allows, by default never: the weights' memory must be a private mapping
    memory = runtime.host_memory(4 << 20)
    start = np.frombuffer(memory, np.uint8).ctypes.data
    for line in Path("/proc/self/maps").read_text().splitlines():
        low, high = (int(a, 16) for a in line.split()[0].split("-"))
        if low <= start < high:
            assert line.split()[1] == "rw-p", line  # p: private, s: shared
            break
    else:
        raise AssertionError("the mapping is not in /proc/self/maps")


def test_on_device_writes_every_weight_into_one_mapping():
    # cast, padded with zero rows, each at a multiple of 64 bytes of one mapping (so that huge
    # pages cover all of it), and the values NumPy has
    rng = np.random.default_rng(5)
    arrays = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(7,)),
              "c": rng.normal(size=(2, 9))}
    shapes = {"a": (8, 3), "b": (7,), "c": (2, 9)}
    tensors = runtime.on_device(arrays, np.float16, shapes)
    for name, t in tensors.items():
        want = np.zeros(shapes[name], np.float16)
        want[: len(arrays[name])] = arrays[name]
        np.testing.assert_array_equal(t.numpy(), want)
    if PLAIN:
        return
    def root(a):  # the memory under a view of a view
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    hosts = [t.uop.buffer.host_array for t in tensors.values()]
    assert len({id(root(h)) for h in hosts}) == 1
    assert all(h.ctypes.data % 64 == 0 for h in hosts)


def test_jit_at_once_replays_its_last_tensors_without_finding_them_again(monkeypatch):
    # a decode step: the same held input, written in place, and a bound Variable that changes.
    # Replays with the last call's tensors skip TinyJit's search of its inputs, yet read the
    # new values; a new tensor goes the whole way again (as a training step's batches do, which
    # pay nothing more). NumPy's numbers throughout.
    import tinygrad.engine.jit as jit_module
    from tinygrad import Variable

    found = []
    prepare = jit_module._prepare_jit_inputs
    monkeypatch.setattr(jit_module, "_prepare_jit_inputs",
                        lambda *a: found.append(1) or prepare(*a))
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    W = Tensor(w).realize()
    step = runtime.jit_at_once(
        lambda tok, n: (W[tok.reshape(-1)] * 2)[:, :20].shrink((None, (0, n))).sum(1).realize())
    tok, calls = None, []
    for i, ids in enumerate(([[3], [5]], [[7], [1]], [[63], [0]], [[2], [2]], [[9], [4]])):
        ids = np.array(ids, dtype=np.int32)
        tok = runtime.host_input(tok, ids) if i != 3 else Tensor(ids).realize()  # 3: a new one
        before = len(found)
        n = 5 + 3 * i
        out = runtime.host_output(step(tok, Variable("n", 1, 20).bind(n)))
        calls.append(len(found) - before)
        np.testing.assert_allclose(out, 2 * w[ids[:, 0], :n].sum(1), rtol=1e-5)
    before = len(found)
    out = runtime.host_output(step(tok, Variable("n", 1, 20).bind(20)))
    calls.append(len(found) - before)
    np.testing.assert_allclose(out, 2 * w[[9, 4], :20].sum(1), rtol=1e-5)
    if not PLAIN:
        # captured; the same tensor again: found once more, and kept; then not searched. The
        # new tensor: searched, and once more when it comes again (written in place)
        assert calls == [1, 1, 0, 1, 1, 0], calls


def test_linear_takes_the_cpu_kernel_only_where_it_fits(monkeypatch):
    # float32 rows on a CPU, one (decoding) or many, with float32 or float16 weights, training
    # or not: the hand-written kernel; float16 rows: tinygrad's own code
    calls = []
    kernel = runtime.cpu_matmul
    monkeypatch.setattr(runtime, "cpu_matmul", lambda *a: calls.append(a[0].shape) or kernel(*a))
    w, b = Tensor.ones(3, 16), Tensor.ones(3)
    got = runtime.product(Tensor.ones(2, 5, 16), w, b).numpy()
    np.testing.assert_array_equal(got, np.full((2, 5, 3), 17))
    assert calls == [(2, 5, 16)]
    one_row = runtime.product(Tensor.ones(1, 1, 16), w.half(), b.half()).numpy()
    np.testing.assert_array_equal(one_row, np.full((1, 1, 3), 17))
    assert calls == [(2, 5, 16), (1, 1, 16)]
    runtime.product(Tensor.ones(5, 16).half(), w.half()).realize()
    assert calls == [(2, 5, 16), (1, 1, 16)]
    with Context(TRAINING=1):
        runtime.product(Tensor.ones(5, 16), w).realize()
        runtime.product(Tensor.ones(1, 16), w).realize()
    assert calls == [(2, 5, 16), (1, 1, 16), (5, 16), (1, 16)]


def test_kept_kernels_are_read_back_by_the_next_process(tmp_path):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    want = (np.maximum(a @ a.T, 0) + 1).sum(1)
    first, second = run_kept(tmp_path), run_kept(tmp_path)
    assert first["generated"] >= 1, first
    assert second["generated"] == 0, f"the second process generated kernels again: {second}"
    np.testing.assert_allclose(first["out"], want, rtol=1e-6)
    np.testing.assert_allclose(second["out"], want, rtol=1e-6)
    # CACHELEVEL=0 turns tinygrad's disk cache off, and the kept kernels with it
    assert run_kept(tmp_path, CACHELEVEL="0")["generated"] >= 1


def device_of(*args: str, **env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "DEV" or v}
    code = "import sys, runtime; print(runtime.use_device(*sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def has_llvm() -> bool:
    # a libLLVM that tinygrad 0.14's CPU:LLVM loads and compiles with (16 or newer), looked up on
    # disk rather than asked of the code
    return any(glob.glob(f"/usr/lib/*/libLLVM-{v}.so*") for v in range(16, 22))


@pytest.mark.skipif(sys.platform != "linux", reason="the default on a Linux CPU machine")
def test_default_backend_on_a_cpu_is_llvm_when_installed_and_dev_wins():
    default = device_of(DEV="")
    assert default.returncode == 0, default.stderr
    want = "CPU (CPULLVMRenderer)" if has_llvm() else "CPU (ClangRenderer)"
    assert default.stdout.strip() == want, default.stdout
    assert device_of(DEV="CPU").stdout.strip() == "CPU (ClangRenderer)"  # DEV wins
    assert device_of("cpu", DEV="").stdout.strip() == "CPU (ClangRenderer)"  # and so does --device


@pytest.mark.parametrize("name, loaded, want", [
    ("/lib/x86_64-linux-gnu/libLLVM-19.so", True, True),
    ("/usr/lib/x86_64-linux-gnu/libLLVM-15.so", True, False),  # tinygrad 0.14 cannot compile
    ("/opt/homebrew/opt/llvm@17/lib/libLLVM.dylib", True, True),
    ("", False, False),  # none found: tinygrad would fail on first use
])
def test_llvm_available_reads_what_tinygrad_loaded(monkeypatch, name, loaded, want):
    from types import SimpleNamespace

    from tinygrad.runtime.autogen import llvm

    import runtime

    fake = SimpleNamespace(nm="llvm", _loaded_={"llvm"} if loaded else set(), _name=name)
    monkeypatch.setattr(llvm, "dll", fake)
    assert runtime.llvm_available() is want


def test_cli_device_that_cannot_run():
    run = cli_process("--device", "NOSUCH", "--steps", "1")
    assert_clean_error(run, "device 'NOSUCH' is not usable")


POCL_KERNEL = """
import sys
from tinygrad import Tensor
if sys.argv[1] == "use_device":
    import runtime
    runtime.use_device()
print((Tensor.ones(4, 4) * 3 + 1).sum().item())  # its code has "((a == b))", which clang flags
"""


@pytest.mark.skipif(not glob.glob("/etc/OpenCL/vendors/*.icd"), reason="needs an OpenCL driver")
@pytest.mark.parametrize("how", ["plain", "use_device"])
def test_pocl_compiles_without_noise_on_stderr(tmp_path, how):
    env = {**os.environ, "DEV": "CL", "CACHEDB": str(tmp_path / "cache.db"),
           "POCL_CACHE_DIR": str(tmp_path / "pocl")}  # empty caches: every kernel is compiled
    env.pop("POCL_EXTRA_BUILD_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", POCL_KERNEL, how], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    if how == "plain":  # the noise that use_device removes is really there without it
        assert "warning generated" in run.stderr, run.stderr
    else:
        assert run.stderr == "", run.stderr


def test_bench_writes_gpt2s_tokenizer_files_that_encode_as_tiktoken(tmp_path):
    # vocab.json and merges.txt for llama.cpp's converter, recovered from tiktoken's ranks: GPT-2's
    # byte-pair encoding with them (OpenAI's encoder.py: merge the lowest-ranked pair until none
    # is left), written out here, gives tiktoken's ids for single words
    import tiktoken

    bench.gpt2_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    lines = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    rank = {tuple(line.split(" ")): i for i, line in enumerate(lines)}
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = {b: chr(b) for b in shown}
    stand_in |= {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in shown)}
    enc = tiktoken.get_encoding("r50k_base")
    assert len(vocab) == 50257 and len(rank) == 50000 and vocab["<|endoftext|>"] == 50256
    for word in (" Hello", " world", "ing", " antidisestablishment", " naïve", "日本語", " 🙂",
                 "\n\n", " 1234", "Ġ"):
        parts = [stand_in[b] for b in word.encode()]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, len(rank)))
            if pair not in rank:
                break
            i = next(i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == pair)
            parts[i:i + 2] = [pair[0] + pair[1]]
        assert [vocab[p] for p in parts] == enc.encode(word), word


def test_bench_sets_each_stretch_of_tokens_against_the_reads_beside_it(monkeypatch):
    # a clock of our own: each token takes 1 s, the first 2 s and a read 100 s. From token 4
    # on, a read every 3 tokens, its time left out of the stamps; each stretch of 3 tokens
    # (1 tok/s) set against the faster read on either side
    monkeypatch.setattr(bench, "STEADY_FROM", 4)
    monkeypatch.setattr(bench, "SEGMENT", 3)
    now = [0.0]

    def tokens(n):
        for i in range(n):
            now[0] += 2.0 if i == 0 else 1.0
            yield i

    readings = iter([30.0, 10.0, 20.0, 50.0])

    def read():
        now[0] += 100.0
        return next(readings)

    stamps, beside = bench.timed_tokens(tokens(14), read, clock=lambda: now[0])
    assert stamps == [2.0 + i for i in range(14)]  # reads after tokens 4, 7, 10 and 13
    assert beside == {"segments": [[1.0, 30.0], [1.0, 20.0], [1.0, 50.0]], "bound_gb_s": 25.0}
    # the bound's share: GPT-2 124M reads its 124,439,808 weights a token, less 1,023 of the
    # 1,024 rows of position embeddings, 4 bytes each; the stretches' median
    per_token = (124_439_808 - 1023 * 768) * 4
    shares = [100 * 1.0 / (g * 1e9 / per_token) for g in (30.0, 20.0, 50.0)]
    results = {"child": beside}
    assert bench.bound_percent(results, "child", 4) == pytest.approx(np.median(shares))
    # --half against fp32 from two children whose machine differed: at the same bandwidth, their
    # speeds per GB/s of the reads beside them, 130 / 37 against 100 / 49
    rows = {row[0].strip(): row for row in bench.table_rows({
        "tinygrad-decode": {"decode_tok_s": 100.0, "segments": [[100.0, 49.0]]},
        "tinygrad-decode-half": {"decode_tok_s": 130.0, "segments": [[130.0, 37.0]]}})}
    assert rows["against tinygrad's fp32 decode (two children, minutes apart)"][1] == "1.30"
    same = rows["the same at the same read bandwidth (2 x its share of the bound / fp32's)"]
    assert same[1] == f"{(130 / 37) / (100 / 49):.2f}" and same[4] == ">= 1.70 met"
    # without stretches (too few tokens): the speed against the reads' median
    results = {"child": {"segments": [], "bound_gb_s": 25.0, "decode_tok_s": 5.0}}
    assert bench.bound_percent(results, "child", 4) == pytest.approx(
        100 * 5.0 / (25.0 * 1e9 / per_token))


def test_bench_context_speeds_take_the_lengths_in_turn(monkeypatch):
    # three rounds of 30, 300 and 900 tokens of context; the third round's are all slow (a busy
    # minute), which the medians and the per-round ratio (900 against 30) leave out
    monkeypatch.setattr(bench, "CONTEXT_TOKENS", 5)
    now, calls = [0.0], []
    step = {(0, 30): 0.1, (0, 300): 0.1, (0, 900): 0.125, (1, 30): 0.1, (1, 300): 0.125,
            (1, 900): 0.125, (2, 30): 0.5, (2, 300): 0.5, (2, 900): 0.5}

    def decode(ids):
        T = ids.shape[1]
        calls.append(T)
        for _ in range(bench.CONTEXT_TOKENS):
            now[0] += step[(calls.count(30) - 1, T)]
            yield 0

    readings = iter([40.0, 30.0, 50.0, 20.0])  # before the rounds, then after each
    got = bench.context_speeds(decode, lambda: next(readings), clock=lambda: now[0])
    assert calls == [30, 300, 900] * 3
    # 5 tokens, timed from the fourth: 1 interval each
    assert got["context_tok_s"] == pytest.approx({"30": 10.0, "300": 8.0, "900": 8.0})
    assert got["context_held"] == pytest.approx(np.median([0.8, 0.8, 1.0]))
    # each round's speed at a length against the faster read beside that round, the median
    assert got["context_gb_s"] == [40.0, 50.0, 50.0]
    per_token = (124_439_808 - 1023 * 768) * 2  # float16
    shares = [100 * s / (g * 1e9 / per_token) for s, g in zip([8.0, 8.0, 2.0], [40.0, 50.0, 50.0])]
    assert bench.bound_percent({"child": got}, "child", 2, 900) == pytest.approx(np.median(shares))


def test_bench_kernel_profile_finds_the_matmul():
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(128, 256)).astype(np.float32) for _ in range(2))

    @TinyJit
    def step(x, y, lr):  # tinygrad's own product, not runtime.product's kernel
        return (runtime.TINYGRAD_DOT(x, y.T) * lr).relu().sum().realize()

    for _ in range(3):
        step(Tensor(a), Tensor(b), Tensor([1.0]))
    profile = bench.kernel_profile(step, a, b, 1.0)
    # 128 x 128 x 256 multiply-adds (8.4 MFLOP) with the relu and the sum fused in: one kernel,
    # a reduce of >= 1 MFLOP, so the matmul; the copies of the inputs are not kernels
    assert [k["name"][:2] for k in profile["profile"]] == ["r_"], profile
    assert profile["matmul_gflops_max"] == profile["matmul_gflops_min"] > 0, profile
    assert 0 < profile["matmul_ms_sum"] == profile["kernel_ms_sum"], profile
