"""What tinygrad 0.14 lacks, mostly on a CPU, added from outside the model files.

The model files (transformer.py, families.py) are plain tinygrad and import nothing from here.
The CLIs call install() once, first; nothing is installed by an import. install() chooses the
backend and puts these pieces in place; none changes what the model computes (the kernels add
the same products in other orders). With TINYGPT_PLAIN=1, or on a tinygrad other than the one
they were written against (then with one note on stderr), none is installed and everything
runs on tinygrad alone. What each buys, measured: docs/speed.md, "The runtime pieces".

- product: the one seam into the model files. Tensor.dot and Tensor.linear (x @ W.T, q @ kᵀ,
  att @ v) by the fastest form here: cpu_matmul where it fits, training included, train_matmul
  when training elsewhere, one row (decoding) as four interleaved sums. Can go when tinygrad's
  own products are as fast.
- keep_kernels: tinygrad caches compiled binaries on disk but generates every kernel's code
  again in each new process; kept, a schedule whose kernels are all kept gets them in one step.
  Can go when tinygrad keeps its generated programs between runs.
- run_on_all_cores: tinygrad splits a large CPU kernel into one chunk per core, then runs the
  chunks one after another; here at once, on helper threads in C (native_cores) that wait for
  the next kernel by spinning a short while, not by waking up through Python. Can go when its
  CPU runtime runs the chunks in parallel again (its threads were deleted after 0.14, PR #17866).
- cpu_graph: TinyJit replays CPU kernels through a generic path that resolves each kernel's
  buffers and arguments again in Python; a prepared table instead, run by one call into C.
  Can go when a CPU graph ships outside the experimental HCQ2.
- use_device: tinygrad picks OpenCL (PoCL) or clang on a CPU; LLVM code generation is the
  fastest. Can go when tinygrad's own default on a CPU is LLVM.
- on_device: tinygrad copies a NumPy array into a fresh buffer of its own; on a CPU the
  arrays are written once, on all cores, into huge pages that become the buffers. Can go when
  Tensor(array) on a CPU takes the array's memory.
- jit_at_once, kept_jits: TinyJits that capture on their first call, replay the tensors of
  their last call without searching them again, and are kept from one call to the next while
  the buffers they read stay the same. Can go when TinyJit takes the number of plain calls as
  an option and checks what it reads, and cheaply.
- host_input, host_output: a decode step's token written into the buffer the step's TinyJit
  read last time, not made a new tensor whose copy the JIT schedules anew; its logits read from
  the buffer the step wrote. Can go when those copies are cheap.
- exit_now: Python's teardown frees tinygrad's graphs one object at a time after every run,
  when nothing is left to use them. Can go when that teardown is quick.
- train_matmul: x Wᵀ with a backward whose kernels read memory in order and split the long
  sums, where tinygrad's own read W across memory and sum all rows in one chain; for training
  where cpu_matmul does not fit (batches sharded across devices, GPUs).
  Can go when tinygrad's matmul backward runs at its forward's speed.
- cpu_matmul: x Wᵀ + b as one hand-written kernel (C vector code compiled by tinygrad's own
  clang compiler, run as a tinygrad program) that keeps vector arithmetic in vectors, as a BLAS
  does; its gradients are the same kernel's products of transposed copies. Can go when
  tinygrad's CPU code does so too.
- cache_matmul: a decode step's q kᵀ and att v as hand-written kernels that read the KV cache
  where it lies, the number of cached keys an argument. Can go when tinygrad's kernels over a
  symbolic length read memory at the speed of its others.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import math
import os
import pickle
import re
import shutil
import string
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from queue import SimpleQueue
from typing import TYPE_CHECKING

from tinygrad import GlobalCounters, Tensor, TinyJit

if TYPE_CHECKING:
    from tinygrad.uop.ops import UOp

# The tinygrad whose internals these pieces reach into; on another, install() adds none of them
TESTED_TINYGRAD = "0.14.0"
# tinygrad's own products, which the pieces below call (install() puts product() in their place)
TINYGRAD_DOT, TINYGRAD_LINEAR = Tensor.dot, Tensor.linear
INSTALLED = False  # set by install(); the pieces that a library call meets check it


def install(device: str | None = None) -> str:
    """Choose the backend (device: a --device flag, else DEV, else use_device's choice) and put
    every piece in place; idempotent. TINYGPT_PLAIN=1, or a tinygrad other than TESTED_TINYGRAD
    (one note on stderr): none, only the device flag is heeded. Returns the device's name."""
    global INSTALLED
    plain = os.environ.get("TINYGPT_PLAIN", "0") not in ("", "0")
    if not plain and version("tinygrad") != TESTED_TINYGRAD:
        print(f"note: tinygrad {version('tinygrad')}, not {TESTED_TINYGRAD}: running on tinygrad "
              "alone, without runtime.py's faster pieces", file=sys.stderr)
        plain = True
    if plain:
        from tinygrad import Device
        from tinygrad.helpers import DEV

        if device:
            DEV.value = device.upper()
        return f"{Device.DEFAULT} ({type(Device[Device.DEFAULT].renderer).__name__})"
    name = use_device(device)
    keep_kernels()
    Tensor.dot, Tensor.linear = _dot, _linear  # the seam (transformer.py names it)
    INSTALLED = True
    return name


def _dot(x: Tensor, w: Tensor, dtype=None) -> Tensor:
    """Tensor.dot (x @ w) once installed: matrices by product, anything else by tinygrad."""
    if dtype is not None or x.ndim < 2 or w.ndim < 2:
        return TINYGRAD_DOT(x, w, dtype)
    return product(x, w.transpose(-2, -1))


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, dtype=None) -> Tensor:
    """Tensor.linear (x @ weight + bias, weight (in, out)) once installed, likewise."""
    if dtype is not None or x.ndim < 2 or weight.ndim != 2:
        return TINYGRAD_LINEAR(x, weight, bias, dtype)
    return product(x, weight.transpose(-2, -1), bias)


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ + b for x (..., in) and weight (out, in), or per entry of a batch, x (..., T, d) and
    weight (..., S, d): what x @ W.T (and x.linear(W.T, b)) computes once installed."""
    if weight.ndim > 2:
        return matmul(x, weight, bias)

    *lead, n_in = x.shape
    n_out = weight.shape[0]
    if cpu_matmul_fits(x, weight, bias):
        return cpu_matmul(x, weight, bias)  # (..., out): x's rows as they lie, not copied flat
    if math.prod(lead) == 1 and n_in % 4 == 0:
        # One row (decoding) off the CPU: as 4 interleaved partial sums, not one serial chain
        # per output, the CPU overlaps them (on OpenCL too)
        products = x.reshape(*lead, 1, n_in // 4, 4) * weight.reshape(n_out, n_in // 4, 4)
        y = products.sum(-2).sum(-1)  # (..., out)
        return y if bias is None else y + bias
    return matmul(x.reshape(-1, n_in), weight, bias).reshape(*lead, n_out)  # (..., out)


class _KeptKernels(dict):
    """tinygrad's in-memory table of generated kernels (to_program_cache), backed by its on-disk
    cache: a kernel generated once is read back in later processes instead of generated again."""

    @staticmethod
    def disk_key(key: tuple) -> str:
        # (the kernel's structural hash, renderer class, target, codegen settings); the class is
        # named, not pickled, so the key stays the same from one process to the next
        ast_key, renderer, *rest = key
        return hashlib.sha256(pickle.dumps((ast_key, renderer.__module__, renderer.__qualname__,
                                            *rest))).hexdigest()

    def __contains__(self, key) -> bool:
        from tinygrad.helpers import diskcache_get

        if dict.__contains__(self, key):
            return True
        try:
            program = diskcache_get(KEPT_KERNELS_TABLE, self.disk_key(key))
        except Exception:  # written by another tinygrad, or damaged: generate it again
            program = None
        if program is None:
            return False
        dict.__setitem__(self, key, program)
        return True

    def get(self, key, default=None):  # how to_program looks (the device's own small programs)
        return dict.__getitem__(self, key) if key in self else default

    def __setitem__(self, key, program):
        from tinygrad.helpers import diskcache_put

        dict.__setitem__(self, key, program)
        diskcache_put(KEPT_KERNELS_TABLE, self.disk_key(key), program)


# generated code depends on the tinygrad that generated it
KEPT_KERNELS_TABLE = f"tinygpt_program_{version('tinygrad')}"


def keep_kernels():
    """Make tinygrad keep the code it generates for each kernel on disk, beside its compiled
    binaries (~/.cache/tinygrad/cache.db; CACHELEVEL=0 turns both off).

    tinygrad 0.14 caches compiled binaries between runs, but regenerates every kernel's code in
    each new process, which was much of a short run's time (docs/speed.md, "The runtime pieces").
    Read back from disk, a kernel seen in an earlier process costs a lookup, not its code
    generation again. Idempotent; the CLIs and bench.py call it, a library user may."""
    import tinygrad.codegen
    import tinygrad.engine.realize

    realize = tinygrad.engine.realize
    if not isinstance(realize.to_program_cache, _KeptKernels):
        kept = _KeptKernels(realize.to_program_cache)
        realize.to_program_cache = tinygrad.codegen.to_program_cache = kept
        realize.lower_and_compile = functools.partial(_swap_in_kept, realize.lower_and_compile)


def _swap_in_kept(lower_and_compile, linear):
    """tinygrad's lower_and_compile, but where every kernel of a schedule is generated already,
    each call gets its program in one step, without tinygrad's rewrite of each kernel's whole
    graph to put it in, which is paid per kernel each time a schedule is lowered
    (docs/speed.md)."""
    import tinygrad.engine.realize as realize
    from tinygrad.uop.ops import Ops

    calls = {c: a for c in linear.toposort()
             if c.op is Ops.CALL and (a := realize._get_call_to_compile(c)) is not None}
    keys = {c: realize.to_program_key(*a) for c, a in calls.items()}
    cache = realize.to_program_cache
    if not calls or any(a[0] is not c.src[0] or keys[c] not in cache for c, a in calls.items()):
        return lower_and_compile(linear)  # generates the new kernels, then swaps as it does
    return linear.substitute({c: c.replace(src=(cache[keys[c]], *c.src[1:])) for c in calls},
                             name="precompile kernels")


class _Cores:
    """Helper threads, one per core beyond the first; each runs the kernel chunks it is handed."""

    def __init__(self):
        self.helpers: list[tuple[SimpleQueue, SimpleQueue]] = []  # (jobs, results) per thread
        self.lock = threading.Lock()  # one kernel at a time, whichever Python thread launches it
        self.handed = 0  # chunks run on helpers so far (for tests)
        os.register_at_fork(after_in_child=self.helpers.clear)  # threads do not survive a fork

    @staticmethod
    def serve(jobs: SimpleQueue, results: SimpleQueue):
        while True:
            fxn, args = jobs.get()
            try:
                results.put(fxn(*args))
            except BaseException as e:  # handed back, raised on the launching thread
                results.put(e)

    def run(self, fxn, chunks: list[list]):
        """fxn(*chunk) for every chunk at the same time: the first here, the others on helpers."""
        if len(chunks) == 1:
            return fxn(*chunks[0])
        with self.lock:
            while len(self.helpers) < len(chunks) - 1:
                self.helpers.append((jobs := SimpleQueue(), results := SimpleQueue()))
                threading.Thread(target=self.serve, args=(jobs, results), daemon=True).start()
            for (jobs, _), args in zip(self.helpers, chunks[1:]):
                jobs.put((fxn, args))
            self.handed += len(chunks) - 1
            try:
                fxn(*chunks[0])
            finally:  # every helper's answer is taken, so none is left over for the next kernel
                errors = [results.get() for _, results in self.helpers[: len(chunks) - 1]]
        for e in errors:
            if isinstance(e, BaseException):
                raise e


_CORES = _Cores()
CORES_SPINS = 20000  # about 0.1-1 ms of waiting for the next kernel, then asleep


# The helper threads in C: each waits for the next kernel by spinning on a counter for a short
# while (a decode step's kernels follow one another within microseconds), then sleeps on a
# condition variable until woken. A kernel's chunks are called with its arguments as 64-bit
# words, as tinygrad's own CPUProgram passes them through ctypes.
CORES_C = string.Template(r"""
#include <pthread.h>
#include <stdint.h>
typedef uint64_t u64;
enum { MAXA = $maxa, SPINS = $spins };
typedef struct { void *fxn; int64_t chunks; const u64 *args; } launch;  /* chunks rows of MAXA */
typedef void (*kernel)($params);
static void call(const launch *l, int64_t c) {
  const u64 *a = l->args + c * MAXA;
  ((kernel)l->fxn)($args);
}
static int helpers;
static const launch *job;
static unsigned gen, done, sleeping, started_at;
static u64 handed;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}
static void *serve(void *arg) {
  int64_t id = (int64_t)(intptr_t)arg;  /* the chunk this thread runs: 1, 2, ... */
  unsigned seen = started_at, g;  /* not gen now: a launch may have begun before this line */
  for (;;) {
    for (long spins = 0; (g = __atomic_load_n(&gen, __ATOMIC_SEQ_CST)) == seen;) {
      if (++spins < SPINS) { relax(); continue; }
      /* asleep until woken: counted first, so that a launch that follows sees it and wakes it */
      pthread_mutex_lock(&mu);
      __atomic_add_fetch(&sleeping, 1, __ATOMIC_SEQ_CST);
      while (__atomic_load_n(&gen, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&cv, &mu);
      __atomic_sub_fetch(&sleeping, 1, __ATOMIC_SEQ_CST);
      pthread_mutex_unlock(&mu);
    }
    seen = g;
    const launch *l = __atomic_load_n(&job, __ATOMIC_SEQ_CST);
    if (id < l->chunks) { call(l, id); __atomic_add_fetch(&handed, 1, __ATOMIC_RELAXED); }
    __atomic_add_fetch(&done, 1, __ATOMIC_SEQ_CST);
  }
  return 0;
}
int cores_start(int n) {  /* n helper threads in all; returns how many run */
  started_at = __atomic_load_n(&gen, __ATOMIC_SEQ_CST);  /* no launch runs during a start */
  while (helpers < n) {
    pthread_t t;
    if (pthread_create(&t, 0, serve, (void *)(intptr_t)(helpers + 1))) break;
    pthread_detach(t);
    helpers++;
  }
  return helpers;
}
void cores_forget(void) {  /* in a forked child, where no helper thread lives on */
  helpers = 0; gen = done = sleeping = 0;
  pthread_mutex_init(&mu, 0); pthread_cond_init(&cv, 0);
}
u64 cores_handed(void) { return __atomic_load_n(&handed, __ATOMIC_SEQ_CST); }
void cores_run(const launch *ls, int64_t count) {  /* each kernel's chunks at once, in order */
  for (int64_t i = 0; i < count; i++) {
    const launch *l = ls + i;
    if (l->chunks == 1 || helpers == 0) {
      for (int64_t c = 0; c < l->chunks; c++) call(l, c);
      continue;
    }
    __atomic_store_n(&job, l, __ATOMIC_SEQ_CST);
    __atomic_store_n(&done, 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&gen, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sleeping, __ATOMIC_SEQ_CST)) {
      pthread_mutex_lock(&mu); pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu);
    }
    call(l, 0);
    for (int64_t c = helpers + 1; c < l->chunks; c++) call(l, c);  /* more chunks than threads */
    while (__atomic_load_n(&done, __ATOMIC_SEQ_CST) < (unsigned)helpers) relax();
  }
}
""")


class Launch(ctypes.Structure):
    """One kernel for native_cores: its code, its number of chunks, and chunks rows of MAX_ARGS
    64-bit arguments (chunk c's core_id in its row)."""
    _fields_ = [("fxn", ctypes.c_void_p), ("chunks", ctypes.c_int64),
                ("args", ctypes.POINTER(ctypes.c_uint64))]


def launches(kernels: list[tuple[int, list[list]]]):
    """Launches for native_cores of kernels, each (the address of its code, one argument list per
    chunk): a ctypes array of Launch, the ctypes array of every chunk's MAX_ARGS arguments that
    they point into (to be kept alive, and written when an argument changes), and where each
    kernel's first chunk's arguments start in it."""
    from tinygrad.runtime.ops_cpu import MAX_ARGS

    rows = sum(len(chunks) for _, chunks in kernels)
    memory, table = (ctypes.c_uint64 * (MAX_ARGS * rows))(), (Launch * len(kernels))()
    starts, row = [], 0
    for i, (fxn, chunks) in enumerate(kernels):
        for c, chunk in enumerate(chunks):
            at = (row + c) * MAX_ARGS
            memory[at:at + len(chunk)] = [getattr(a, "value", a) for a in chunk]
        args = ctypes.byref(memory, row * MAX_ARGS * 8)  # a pointer to the chunk's row
        table[i] = Launch(fxn, len(chunks), ctypes.cast(args, ctypes.POINTER(ctypes.c_uint64)))
        starts.append(row * MAX_ARGS)
        row += len(chunks)
    return table, memory, starts


@functools.cache
def native_cores() -> ctypes.CDLL | None:
    """The C helper threads (CORES_C), built once per machine into tinygrad's cache folder and
    started with one thread per core beyond the first; None where there is no C compiler or the
    build fails (then _CORES's Python threads run the chunks)."""
    import subprocess
    import tempfile

    from tinygrad.helpers import NUM_CPU_THREADS, cache_dir
    from tinygrad.runtime.ops_cpu import MAX_ARGS

    compiler = _c_compiler()
    if compiler is None or sys.platform != "linux":
        return None
    source = CORES_C.substitute(
        maxa=MAX_ARGS, spins=CORES_SPINS, params=", ".join(["u64"] * MAX_ARGS),
        args=", ".join(f"a[{i}]" for i in range(MAX_ARGS)))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "tinygpt", f"cores-{digest}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c_file = os.path.join(tmp, "cores.c")
            with open(c_file, "w") as f:
                f.write(source)
            so_file = f"{path}.{os.getpid()}"  # beside it, so that the rename below is atomic
            built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-pthread", c_file, "-o",
                                    so_file], capture_output=True)
            if built.returncode != 0:
                return None
            os.replace(so_file, path)  # whole, or not there: another process may be reading it
    lib = ctypes.CDLL(path)
    lib.cores_run.argtypes = [ctypes.POINTER(Launch), ctypes.c_int64]
    lib.cores_handed.restype = ctypes.c_uint64
    lib.cores_start(NUM_CPU_THREADS.value - 1)
    # a forked child has none of the threads: its own start
    os.register_at_fork(after_in_child=lambda: (lib.cores_forget(),
                                                lib.cores_start(NUM_CPU_THREADS.value - 1)))
    return lib


def run_launches(table, count: int):
    """count Launches (table: a ctypes array, or one Launch by reference) by native_cores, in
    order, one kernel at a time whichever Python thread calls. _CORES.handed counts the chunks
    its helper threads ran (for tests)."""
    lib = native_cores()
    with _CORES.lock:
        before = lib.cores_handed()
        lib.cores_run(table, count)
        _CORES.handed += lib.cores_handed() - before



def chunk_args(args: list[int], core: int | None, n: int) -> list[list[ctypes.c_uint64]]:
    """A compiled CPU kernel's arguments for each of its n chunks: the same, but for the
    chunk's number at position `core` (tinygrad's core_id; None: the kernel is not split)."""
    return [[ctypes.c_uint64(tid if i == core else a) for i, a in enumerate(args)]
            for tid in range(n)]


def run_on_all_cores():
    """Run the chunks of each CPU kernel on all cores at once.

    tinygrad 0.14 splits a large CPU kernel (128K operations per core or more) into one chunk
    per core, told apart by a `core_id` argument, then calls the chunks one after another on
    one thread. Here chunk 0 runs on the calling thread and the others on helper threads at the
    same time: native_cores' threads in C, or where it cannot be built _CORES's in Python
    (ctypes lets go of Python's lock while compiled code runs; handing a chunk over and back
    through Python's queues costs 15-40 us). The chunks write disjoint outputs, so results are
    bit for bit the same. What it buys each training step: docs/speed.md, "Both cores".
    Idempotent; use_device calls it."""
    from tinygrad.runtime.ops_cpu import CPUProgram

    serial = CPUProgram.__call__
    if getattr(serial, "all_cores", False):
        return

    def call(self, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False,
             timeout=None):
        slot = self.runtimevars.get("core_id")
        if slot is None or self.lvp or global_size[0] == 1:
            return serial(self, *bufs, global_size=global_size, local_size=local_size, vals=vals,
                          wait=wait, timeout=timeout)
        start = time.perf_counter()
        chunks = chunk_args([*(b.va_addr for b in bufs), *vals], slot, global_size[0])
        if native_cores() is not None:
            table, args, _ = launches([(self.addr, chunks)])  # args: kept alive for the call
            run_launches(table, 1)
        else:
            _CORES.run(self.fxn, chunks)
        return time.perf_counter() - start if wait else None

    call.all_cores = True
    CPUProgram.__call__ = call


@functools.cache
def cpu_graph():
    """The class CPUGraph, made on first use: it subclasses tinygrad's internal GraphRunner."""
    import numpy as np
    from tinygrad.engine.jit import GraphRunner
    from tinygrad.engine.realize import get_call_arg_uops
    from tinygrad.uop.ops import Ops

    class CPUGraph(GraphRunner):
        """TinyJit's replay of a run of CPU kernels as one loop over prepared calls.

        tinygrad 0.14 batches the kernels of a captured function into graphs on GPUs; on the CPU
        it replays them one by one through its generic path, which resolves each kernel's
        buffers, launch sizes and arguments again in Python besides running it. Here each kernel's
        function and arguments are prepared once; a replay writes in the buffers and variable
        values that change between calls, then calls the functions in order (the chunks of split
        ones on all cores, as run_on_all_cores does). Every number the same to the bit."""

        replays = 0  # calls of any CPUGraph so far (for tests)

        def __init__(self, linear: UOp, input_uops: tuple[UOp, ...] = ()):
            super().__init__(linear, input_uops)
            self.launches = []  # per kernel: (compiled function, argument list per chunk)
            patches = []  # (kernel, argument, input slot): buffers that change between calls
            first_var = []  # per kernel: where its variables start among its arguments
            zeros = {v: 0 for v in self.vars}
            addresses = []
            for j, ((_, program, bufs, device_vars), runtime) in enumerate(zip(self.calls,
                                                                               self.runtimes)):
                info = program.arg
                kernel_bufs = [bufs[i] for i in info.globals]
                args = [b.get_buf(b.device).va_addr for b in kernel_bufs]
                args += [device_vars.get(v.expr, 0) for v in info.vars]
                core = runtime.runtimevars.get("core_id")
                n = info.launch_dims(zeros)[0][0] if core is not None else 1
                self.launches.append((runtime.fxn, chunk_args(args, core, n)))
                addresses.append(runtime.addr)
                patches += [(j, k, slot) for p, slot in self.uop_replace[j]
                            for k, g in enumerate(info.globals) if g == p]
                first_var.append(len(kernel_bufs))
            # every chunk's arguments in one array (what the C helper threads read), and the
            # places in it of each input buffer and each variable: a replay writes each with one
            # NumPy assignment
            self.table, memory, self.starts = launches(list(zip(addresses, (
                chunks for _, chunks in self.launches))))
            self.args = np.ctypeslib.as_array(memory)  # a view that keeps memory alive
            places: dict[tuple, list[int]] = {}  # ("buffer", input slot) or ("var", name)
            for j, k, slot in patches:
                places.setdefault(("buffer", slot), []).extend(self.spots(j, k))
            for j, vidxs in self.var_vals_replace.items():
                for i, v in vidxs:
                    places.setdefault(("var", self.vars[v]), []).extend(
                        self.spots(j, first_var[j] + i))
            self.places = {key: np.array(spots) for key, spots in places.items()}

        def spots(self, j: int, k: int) -> list[int]:
            """Argument k of kernel j in every one of its chunks: places in self.args."""
            from tinygrad.runtime.ops_cpu import MAX_ARGS

            return [self.starts[j] + c * MAX_ARGS + k for c in range(len(self.launches[j][1]))]

        def __call__(self, input_uops: tuple[UOp, ...], var_vals: dict[str, int], wait=False):
            from tinygrad.runtime.ops_cpu import MAX_ARGS

            for (kind, key), places in self.places.items():
                if kind == "buffer":
                    buf = input_uops[key].buffer
                    self.args[places] = buf.get_buf(buf.device).va_addr
                else:
                    self.args[places] = var_vals[key]
            start = time.perf_counter()
            if native_cores() is not None:
                run_launches(self.table, len(self.table))
            else:  # Python's threads, each chunk's arguments read from the array
                for (fxn, chunks), first in zip(self.launches, self.starts):
                    _CORES.run(fxn, [[ctypes.c_uint64(int(a)) for a in self.args[
                        first + c * MAX_ARGS:][:len(chunk)]] for c, chunk in enumerate(chunks)])
            GlobalCounters.kernel_count += len(self.launches) - 1  # tinygrad counts a graph as one
            CPUGraph.replays += 1
            return time.perf_counter() - start if wait else None

        @staticmethod
        def supports_uop(batch_devs, call: UOp) -> bool:
            """A compiled kernel on the batch's one device, launched over a fixed number of chunks,
            whose arguments are whole buffers (a view of a changing input would not be patched)."""
            program = call.src[0]
            return (program.op is Ops.PROGRAM
                    and len(GraphRunner._all_devs(batch_devs, call)) == 1
                    and all(isinstance(n, int) for n in program.arg.global_size)
                    and all(u.op in (Ops.BUFFER, Ops.PARAM)
                            or Ops.PARAM not in {s.op for s in u.src}
                            for u in get_call_arg_uops(call)))

    return CPUGraph


def batch_cpu_kernels():
    """Let TinyJit replay the default device's kernels through CPUGraph, if it is a CPU, all of
    a capture's kernels in one graph: TinyJit cuts graphs of 32, 64, ... kernels so that a GPU
    starts on the first while the next is sent, where a CPU would only wait longer (JIT_BATCH_SIZE
    in the environment still rules). Idempotent; use_device calls it."""
    from tinygrad import Device
    from tinygrad.helpers import JIT_BATCH_SIZE
    from tinygrad.runtime.ops_cpu import CPUDevice

    device = Device[Device.DEFAULT]
    if isinstance(device, CPUDevice) and type(device.renderer).__name__ != "LVPRenderer":
        device.graph = cpu_graph()
        if "JIT_BATCH_SIZE" not in os.environ:
            JIT_BATCH_SIZE.value = 0  # no limit


def use_device(device: str | None = None) -> str:
    """Choose the tinygrad backend: `device` (a --device flag) if given, else DEV, else the
    fastest measured here. Opens it, so a backend that cannot run fails now; returns its name.

    tinygrad picks a GPU backend when there is one, else OpenCL, else the CPU with clang. On a CPU
    (no GPU backend, or OpenCL served by PoCL on the CPU) this picks the CPU with LLVM code
    generation when libLLVM is installed (setup.sh does): PoCL compiles each new kernel slowly,
    and LLVM's code ran the demo and every training step measured sooner than clang's
    (docs/speed.md, Backends). DEV=CL or --device CL picks PoCL. On a CPU backend it also runs
    kernels on all cores and replays TinyJit's kernels through CPUGraph."""
    from tinygrad import Device
    from tinygrad.helpers import DEV

    if device:
        DEV.value = device.upper()
    elif not os.environ.get("DEV"):
        # Without a GPU's device file no GPU backend can open, so tinygrad's own search (it opens
        # each backend in turn, then PoCL, which takes a while) would end on the CPU anyway
        on_cpu = not gpu_device_files()
        if not on_cpu:
            auto = Device.DEFAULT
            on_cpu = auto == "CPU" or (auto == "CL" and "pthread" in Device["CL"].device_name)
        if on_cpu and llvm_available():
            DEV.value = "CPU:LLVM"
    # PoCL's compiler prints "1 warning generated." for each new kernel (tinygrad's generated
    # code has "((a == b))"); -w keeps stderr for messages that matter
    os.environ.setdefault("POCL_EXTRA_BUILD_FLAGS", "-w")
    run_on_all_cores()
    batch_cpu_kernels()
    renderer = type(Device[Device.DEFAULT].renderer).__name__
    return f"{Device.DEFAULT} ({renderer})"


def gpu_device_files() -> list[str]:
    """The device files through which tinygrad's GPU backends reach a GPU on Linux (NVIDIA, AMD's
    KFD, DRM render nodes for OpenCL, Qualcomm's KGSL); elsewhere (macOS: Metal) a stand-in, so
    tinygrad searches as usual."""
    if not sys.platform.startswith("linux"):
        return ["(not Linux)"]
    import glob

    return [f for pattern in ("/dev/nvidia*", "/dev/kfd", "/dev/dri/renderD*", "/dev/kgsl*")
            for f in glob.glob(pattern)]


def llvm_available() -> bool:
    """Is there a libLLVM that tinygrad 0.14 loads and can compile with (16 or newer)?"""
    try:
        from tinygrad.runtime.autogen import llvm

        dll = llvm.dll
        if dll.nm not in dll._loaded_:  # tinygrad found no libLLVM; it fails on first use
            return False
        found = re.search(r"(?:LLVM-|llvm@)(\d+)", dll._name)
    except Exception:
        return False
    # tinygrad loads LLVM 14 and 15 too, then fails to compile with them
    return found is None or int(found.group(1)) >= 16


def exit_now(code: int | None):
    """End a CLI process without Python's teardown, which frees tinygrad's graphs and caches one
    object at a time, work for nothing once the process ends (its cost: docs/speed.md). The exit
    handlers (tinygrad's device finalizers) still run and the output streams are flushed; files
    are all closed by then (checkpoints are renamed into place, the kernel cache commits each
    write)."""
    if not INSTALLED:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def host_memory(nbytes: int):
    """nbytes of zeroed, page-aligned host memory. On Linux it asks for huge pages
    (MADV_HUGEPAGE): the kernel then maps 2 MiB at a time, not 4 KiB, so the first writes to
    fresh memory take one page fault per 2 MiB instead of one per 4 KiB, and reading it takes
    one TLB entry per 2 MiB (docs/speed.md). Private: Python's mmap is shared by default, and
    Linux gives shared memory huge pages only where shmem_enabled allows (default: never)."""
    import mmap

    unix = hasattr(mmap, "MAP_ANONYMOUS")
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if unix else {}
    memory = mmap.mmap(-1, max(nbytes, 1), **private)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def on_device(arrays: dict, dtype, shapes: dict) -> dict[str, Tensor]:
    """NumPy arrays as tensors on the default device, each cast to dtype and written once.
    shapes[name] may have more rows than the array: those rows are zeros (GPT-2's vocabulary,
    padded; see transformer.Transformer).

    tinygrad 0.14's Tensor(array) copies an array into a fresh buffer of its own. On a CPU
    device each array is written instead (cast, transposed, padded) into zeroed host memory that
    becomes the buffer itself and lives as long as the buffers do, the copies on all cores at
    once (NumPy lets go of Python's lock while it copies): one write per weight, not two, and
    no kernel to schedule (GPT-2 124M's loading: docs/speed.md). Elsewhere each is copied to the
    device as before. Can go when Tensor(array) on a CPU takes the array's memory as it is."""
    import numpy as np
    from tinygrad import Device
    from tinygrad.dtype import _from_np_dtype
    from tinygrad.runtime.ops_cpu import CPUDevice

    on_cpu = INSTALLED and isinstance(Device[Device.DEFAULT], CPUDevice)  # else Tensor(array)
    # on a CPU one mapping holds them all, each at a multiple of 64 bytes (a cache line): huge
    # pages cover all of it, where a mapping per weight left each one's last part of 2 MiB in
    # small pages, which a decode step reads more slowly (docs/speed.md)
    sizes = {name: math.prod(shapes[name]) for name in arrays}
    starts = np.cumsum([0] + [-(-n * np.dtype(dtype).itemsize // 64) * 64 for n in sizes.values()])
    memory = host_memory(int(starts[-1])) if on_cpu else None

    def host(name: str, start: int) -> np.ndarray:
        array, shape, size = arrays[name], tuple(shapes[name]), sizes[name]
        if not on_cpu and shape == array.shape:
            return np.ascontiguousarray(array, dtype)  # no copy where none is needed
        if on_cpu:
            out = np.frombuffer(memory, dtype, count=size, offset=start).reshape(shape)
        else:
            out = np.zeros(shape, dtype)
        np.copyto(out[: len(array)], array, casting="same_kind")
        return out

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        hosts = dict(zip(arrays, pool.map(host, arrays, map(int, starts))))
    if not on_cpu:
        return {name: Tensor(a, device=Device.DEFAULT) for name, a in hosts.items()}
    tensors = {}
    for name, a in hosts.items():
        t = Tensor.from_blob(a.ctypes.data, a.shape, dtype=_from_np_dtype(a.dtype),
                             device=Device.DEFAULT)
        t.uop.buffer.host_array = a  # its memory: freed with the last of the buffers, not before
        tensors[name] = t
    return tensors


def jit_at_once(fxn) -> TinyJit:
    """A TinyJit of fxn that captures on its first call. TinyJit runs a function plainly once and
    captures it on the second call, in case the first creates buffers (a KV cache, optimizer
    state); for one that creates none, or only buffers that live tensors hold (TinyJit 0.14
    keeps those out of its memory plan: a prefill's KV caches, which the model holds), the plain
    call is a pass of tinygrad's scheduler for nothing before the capture (what it cost GPT-2's
    decode warm-up: docs/speed.md). Once installed it is a _QuickJit. Can go when TinyJit takes
    the number of plain calls as an option."""
    if not INSTALLED:
        return TinyJit(fxn)  # TinyJit as it is
    jit = _quick_jit()(fxn)
    jit.cnt = 1  # calls so far: the next one captures
    return jit


@functools.cache
def _quick_jit():
    """The class _QuickJit, made on first use: it subclasses tinygrad's internal _TinyJit."""
    from tinygrad.engine import jit as tinyjit
    from tinygrad.uop.ops import UOp

    class _QuickJit(tinyjit._TinyJit):
        """A TinyJit whose replay with the very tensors of its last call (a decode step's token,
        written in place by host_input) skips finding and checking its inputs again, the most
        of a decode step's Python, in caches the step has just flushed (docs/speed.md). Only
        the variables' values are read anew. Can go when TinyJit's check of its inputs is that
        cheap."""

        last = None  # the last call's tensors and their UOps
        found = None  # its input buffers and their variables' values, as TinyJit finds them

        def __call__(self, *args, **kwargs):
            tensors = [(a, a.uop) for a in args if isinstance(a, Tensor)]
            if (self.last is not None and self.captured is not None and not kwargs
                    and len(tensors) == len(self.last)
                    and all(a is b and u is v for (a, u), (b, v) in zip(tensors, self.last))):
                if self.found is None:  # a second call with them: found once, and kept
                    self.found = tinyjit._prepare_jit_inputs(args, {})[:2]
                buffers, values = self.found
                bound = dict(a.unbind() for a in args if isinstance(a, UOp))  # Variable: value
                self.cnt += 1
                return self.captured(buffers, values | {v.expr: n for v, n in bound.items()})
            self.last, self.found = tensors, None
            return super().__call__(*args, **kwargs)

    return _QuickJit


_HOST_VIEWS: dict = {}  # _host_view's last answers: t's UOp -> (its buffer, its memory, view)


def _host_view(t: Tensor):
    """A NumPy view of t's elements in the memory of its buffer, when t is a realized buffer on a
    CPU device or a view of one (strided: the logits' slice of the padded output layer); else
    None. The last few are kept: a decode step reads and writes the same buffers every time, and
    finding the view again cost more than the copy through it, in caches the step has just
    flushed."""
    import numpy as np
    from tinygrad.device import Buffer
    from tinygrad.dtype import _to_np_dtype
    from tinygrad.runtime.ops_cpu import CPUDevice
    from tinygrad.uop.ops import Ops

    # the same memory: a buffer freed and allocated again would be elsewhere
    if (kept := _HOST_VIEWS.get(t.uop)) is not None:
        buf, memory, array = kept
        if buf._bufs.get(buf.device) is memory:
            return array
    if (view := strided(t)) is None or not all(isinstance(s, int) for s in view[1]):
        return None
    base, shape, steps, offset = view
    buf = base.uop.buffer if base.uop.op is Ops.BUFFER else None
    if not isinstance(buf, Buffer) or not buf.is_allocated() or buf.size != base.numel():
        return None
    if not isinstance(buf.allocator.dev, CPUDevice) or _to_np_dtype(buf.dtype) is None:
        return None
    # no copy: synchronized first, so no kernel still writes it
    flat = np.frombuffer(buf.as_memoryview(force_zero_copy=True), dtype=_to_np_dtype(buf.dtype))
    array = np.lib.stride_tricks.as_strided(flat[offset:], shape,
                                            [step * flat.itemsize for step in steps])
    _HOST_VIEWS[t.uop] = (buf, buf._bufs.get(buf.device), array)
    if len(_HOST_VIEWS) > 8:  # the oldest goes
        del _HOST_VIEWS[next(iter(_HOST_VIEWS))]
    return array


def host_input(held: Tensor | None, array) -> Tensor:
    """A NumPy array as a TinyJit's input. Tensor(array) is a new tensor each call, whose copy
    onto the device the JIT schedules before it replays: milliseconds for one token per decode
    step (docs/speed.md). Once installed, array is written into held's own buffer instead, when
    held is a realized tensor of its shape and type, and held comes back; else a new tensor,
    realized, to be held. Can go when a TinyJit takes host arrays as cheaply."""
    from tinygrad.device import Buffer
    from tinygrad.dtype import _from_np_dtype

    if not INSTALLED:
        return Tensor(array)
    if held is None or held.shape != array.shape or held.dtype != _from_np_dtype(array.dtype):
        return Tensor(array).contiguous().realize()
    if (memory := _host_view(held)) is not None and memory.flags.writeable:  # written in place
        memory[...] = array
        return held
    host = Buffer("PYTHON", array.size, held.dtype, opaque=memoryview(bytearray(array.tobytes())))
    held.uop.buffer.copy_from(host)
    return held


def host_output(t: Tensor):
    """t's values as a NumPy array (a copy). Tensor.numpy() schedules and runs a copy through
    tinygrad's graph rewrites each call: 0.3 ms for a decode step's one row of logits, a tenth
    of the step with --half (docs/speed.md). Once installed, a realized buffer on a CPU is read
    where it lies. Can go when Tensor.numpy() of a realized buffer is that cheap."""
    view = _host_view(t) if INSTALLED else None
    return t.numpy() if view is None else view.copy()


class _Kept:
    """TinyJits and what they read. Slots, not a __dict__: tinygrad's get_state_dict (a model's
    parameters, its checkpoints) does not walk into them."""
    __slots__ = ("key", "reads", "jits")

    def __init__(self, key, reads: dict, jits: dict):
        self.key, self.reads, self.jits = key, reads, jits


def kept_jits(owner, key) -> dict:
    """A dict of TinyJits kept on owner (a model) from one call to the next, for as long as key
    and every tensor owner holds (get_state_dict: weights, KV caches) are the same buffers. A
    TinyJit replays the buffers it was captured with, and tinygrad 0.14 does not notice when a
    tensor it read has become another buffer (new weights, a new KV cache). A tensor that is new
    (a KV cache made by a first capture) was read by no TinyJit before it. The tensors are
    realized first, so that weights made lazily are not made inside a capture. Can go when a
    TinyJit checks what it reads."""
    from tinygrad.nn.state import get_state_dict

    if not INSTALLED:
        return {}  # nothing kept: each call makes its own
    tensors = get_state_dict(owner)  # _Kept has no __dict__: not walked into
    Tensor.realize(*tensors.values())
    reads = {name: t.uop for name, t in tensors.items()}
    kept = getattr(owner, "_kept_jits", None)
    if kept is None or kept.key != key or any(reads.get(k) is not u for k, u in kept.reads.items()):
        kept = owner._kept_jits = _Kept(key, reads, {})
    kept.reads = reads
    return kept.jits


PARTIAL_BYTES = 256 * 2**20  # matmul_backward's blocks of dW partial sums, all together


def matmul_backward(grad: UOp, call: UOp) -> tuple[UOp, UOp]:
    """The gradients of y = x Wᵀ (x (N, in), W (out, in)), written so that tinygrad 0.14 makes
    fast CPU kernels of them. Its own backward reads W across memory for dx, and reduces dW over
    all N rows in one long sum, a serial chain per output: both run well below the forward.
    - dx = g W reads W through a transposed copy, so each of its sums runs along memory.
    - dW = gᵀ x as up to 32 partial sums over blocks of rows, stored, then added: each block's
      sum is shorter, and the blocks are independent work for the cores.
    What each bought: docs/speed.md, "Linear's backward for training"."""
    g, x, w = (Tensor(u) for u in (grad, *call.src[1:]))
    N, n_in = x.shape
    n_out = w.shape[0]
    dx = TINYGRAD_DOT(g, w.T.contiguous().T)  # (N, out) @ (out, in): the view of an (in, out) copy
    # at most PARTIAL_BYTES of partial sums: GPT-2's 50,304 x 768 embedding in 32 blocks took
    # 4.9 GB twice over (its lookup and the output layer), and fine-tuning 124M outgrew 19 GB
    k = max((d for d in range(1, 33) if N % d == 0 and d * n_out * n_in * 4 <= PARTIAL_BYTES),
            default=1)
    g_blocks = g.reshape(k, N // k, n_out).transpose(1, 2)  # (k, out, N/k)
    dw = TINYGRAD_DOT(g_blocks, x.reshape(k, N // k, n_in)).contiguous().sum(0)  # (out, in)
    return dx.uop, dw.uop


def train_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x Wᵀ for x (N, in), with the backward above."""
    return _train_matmul()(x, weight)


@functools.cache
def _train_matmul():
    from tinygrad.function import function

    @function(grad_fxn=matmul_backward)
    def x_wt(x: Tensor, weight: Tensor) -> Tensor:  # not the seam's product: tinygrad's own
        return TINYGRAD_DOT(x, weight.T)

    return x_wt


# What the hand-written kernels share: 8 floats loaded at once (a last part of fewer with
# zeros after it), W of type $wtype widened to float32 as loaded where $half, and the sum of
# 8 lanes in a fixed order.
VECTORS_C = r"""
typedef float f8 __attribute__((ext_vector_type(8)));
typedef short s8 __attribute__((vector_size(16)));
typedef $wtype W;
static inline f8 load8(const float *p, int n) {
  f8 v = 0; __builtin_memcpy(&v, p, (unsigned long)n * sizeof(float)); return v;
}
static inline f8 loadw8(const W *p, int n) {
#if $half && defined(__F16C__)
  s8 h = {0}; __builtin_memcpy(&h, p, (unsigned long)n * 2); return __builtin_ia32_vcvtph2ps256(h);
#elif $half
  f8 v = 0; for (int i = 0; i < n; i++) v[i] = (float)p[i]; return v;
#else
  return load8(p, n);
#endif
}
static inline float sum8(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
"""

# x Wᵀ (+ b) for x (M, K), W (N, K), b (N,), or a batch of them: each output is a dot product
# of two rows that lie along memory. A tile of MR rows of x (3, or as many as there are) by 4
# rows of W keeps MR x 4 sums of 8 lanes each in registers, so each 8 floats loaded serve 3 or 4
# multiply-adds; a last part of fewer than 8 is read as 8 with zeros after it. W (and b) may be
# float16 (--half), widened to float32 as it is loaded (8 at once by F16C's vcvtph2ps on x86):
# half the bytes to read. Every output adds its products in the same order whatever M (above 1)
# and the tiling are, so a row's result does not depend on the rows beside it, and zeros after a
# row (padded keys, whose attention is 0) leave it as it was. A row's 4 sums of 8 lanes end
# together, by shuffles that add across the 4: one at a time they cost as much as the products
# where the sums are short (q kᵀ's 64; docs/speed.md). One row alone (decoding) reads
# each row of W start to end in one stream instead (4 rows of W interleaved took float16 at half
# the speed on the build machine), its sums split 8 ways: the same within float32 rounding.
MATMUL_C = string.Template(VECTORS_C + r"""
typedef float f4 __attribute__((ext_vector_type(4)));
static inline f4 sum4x8(f8 a, f8 b, f8 c, f8 d) {  /* the sums of 4 vectors, side by side */
  f8 ab = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
        + __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);  /* a0+a1 b0+b1 a2+a3 .. */
  f8 cd = __builtin_shufflevector(c, d, 0, 8, 2, 10, 4, 12, 6, 14)
        + __builtin_shufflevector(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  f8 q = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13)
       + __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);  /* a0..3 b0..3 .. d4..7 */
  return __builtin_shufflevector(q, q, 0, 1, 2, 3) + __builtin_shufflevector(q, q, 4, 5, 6, 7);
}
#define STEP(k, len) {                                                                  \
  f8 a[MR];                                                                             \
  for (int i = 0; i < MR; i++) a[i] = load8(xr[i] + (k), len);                          \
  for (int j = 0; j < 4; j++) {                                                         \
    f8 b = loadw8(wr[j] + (k), len);                                                    \
    for (int i = 0; i < MR; i++) acc[i][j] += a[i] * b;                                 \
  }                                                                                     \
}
void $name(float *restrict out, const float *restrict x, const W *restrict w,$bias
           int core_id) {
  enum { BATCH = $batch, M = $M, N = $N, K = $K, CORES = $cores, MR = $mr };
  /* the cores share out the batch's entries, or each entry's rows of x, or (for a row or two
     of x, as in decoding) the rows of W, four at a time */
  enum { BY_BATCH = $by == 0, BY_ROWS = $by == 1, BY_COLS = $by == 2 };
  enum { SHARE = BY_BATCH ? BATCH : BY_ROWS ? M : (N + 3) / 4 };
  enum { PER = (SHARE + CORES - 1) / CORES };
  int s0 = core_id * PER, s1 = s0 + PER < SHARE ? s0 + PER : SHARE;
  int c0 = BY_COLS ? 4 * s0 : 0, c1 = BY_COLS ? (4 * s1 < N ? 4 * s1 : N) : N;
  for (int bt = BY_BATCH ? s0 : 0; bt < (BY_BATCH ? s1 : BATCH); bt++) {
    const float *xb = x + (long)bt * M * K;
    const W *wb = w + $wplace;
    float *ob = out + (long)bt * M * N;
    int m0 = BY_ROWS ? s0 : 0, m1 = BY_ROWS ? s1 : M;
    if (M == 1) {  /* one row of x (decoding): W read once, so the order of the reads rules */
      for (int n = c0; n < c1; n++) {
        const W *wn = wb + (long)n * K;
        f8 acc[8] = {0};
        int k = 0;
        for (; k + 64 <= K; k += 64)  /* a row of W start to end, 8 sums of 8 lanes apart */
          for (int u = 0; u < 8; u++)
            acc[u] += load8(xb + k + 8 * u, 8) * loadw8(wn + k + 8 * u, 8);
        for (; k + 8 <= K; k += 8) acc[0] += load8(xb + k, 8) * loadw8(wn + k, 8);
        if (K % 8) acc[0] += load8(xb + k, K % 8) * loadw8(wn + k, K % 8);
        f8 s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        ob[n] = sum8(s)$add_bias_n;
      }
      continue;
    }
    for (int n0 = c0; n0 < c1; n0 += 64) {  /* 64 rows of W stay in cache */
      int n1 = n0 + 64 < c1 ? n0 + 64 : c1;
      for (int m = m0; m < m1; m += MR) {
        int mr = m1 - m < MR ? m1 - m : MR;
        for (int n = n0; n < n1; n += 4) {
          int nr = n1 - n < 4 ? n1 - n : 4;
          const float *xr[MR];  /* past the edge: row 0 again, computed, not stored */
          const W *wr[4];
          for (int i = 0; i < MR; i++) xr[i] = xb + (long)(m + (i < mr ? i : 0)) * K;
          for (int j = 0; j < 4; j++) wr[j] = wb + (long)(n + (j < nr ? j : 0)) * K;
          f8 acc[MR][4] = {{0}};
          for (int k = 0; k + 8 <= K; k += 8) STEP(k, 8)
          if (K % 8) STEP(K - K % 8, K % 8)
          for (int i = 0; i < mr; i++) {
            f4 s = sum4x8(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            for (int j = 0; j < nr; j++) ob[(long)(m + i) * N + n + j] = s[j]$add_bias;
          }
        }
      }
    }
  }
}
""")



def cpu_matmul_fits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Can cpu_matmul take x Wᵀ + b: x float32, W and b float32 or float16 on a CPU device
    compiled by tinygrad (not LVP), whole sizes, W (N, K) for x (..., K) or one W per entry of
    x's batch, and a C compiler."""
    from tinygrad import dtypes

    floats = (dtypes.float32, dtypes.float16)
    if dtypes.float32 != x.dtype or weight.dtype not in floats:
        return False
    if bias is not None and (bias.dtype not in floats or bias.device != x.device):
        return False
    if not isinstance(x.device, str) or x.device != weight.device:  # sharded, or two devices
        return False
    if not all(isinstance(s, int) for s in (*x.shape, *weight.shape)):  # symbolic (decoding)
        return False
    if x.ndim < 2 or x.shape[-1] != weight.shape[-1]:
        return False
    if weight.ndim != 2 and x.shape[:-2] != weight.shape[:-2]:  # one W, or one per entry
        return False
    return _c_device(x.device) is not None


@functools.cache
def _c_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "clang"))


def _c_device(name: str):
    """The device a hand-written kernel runs on: a CPU device whose code tinygrad compiles (not
    LVP), with a C compiler here; else None."""
    from tinygrad import Device
    from tinygrad.runtime.ops_cpu import CPUDevice

    device = Device[name]
    if not isinstance(device, CPUDevice) or type(device.renderer).__name__ == "LVPRenderer":
        return None
    return device if _c_compiler() is not None else None


def _c_program(name: str, source: str, device, n_bufs: int, cores: int, estimates,
               var=None):
    """custom_kernel's fxn for a hand-written C kernel: compiled here by tinygrad's clang
    compiler, run as a tinygrad program over n_bufs buffers (the output first) with the chunk's
    core_id, and var's value after it where the kernel takes one (a count of cached positions)."""
    from tinygrad import dtypes
    from tinygrad.dtype import AddrSpace
    from tinygrad.uop.ops import KernelInfo, Ops, ProgramInfo, UOp

    binary = _compile_c(source, device.renderer.target)

    def program(*params: UOp) -> UOp:
        core_id = UOp.param(n_bufs, dtypes.int, (), vmin_vmax=(0, cores - 1), name="core_id",
                            addrspace=AddrSpace.ALU)
        values = (core_id,) if var is None else (core_id, UOp.param(
            n_bufs + 1, dtypes.int, (), vmin_vmax=(var.vmin, var.vmax), name=var.expr,
            addrspace=AddrSpace.ALU))
        info = ProgramInfo(name, (cores, 1, 1), (1, 1, 1), values, tuple(range(n_bufs)), (0,),
                           tuple(range(1, n_bufs)), device.renderer.target)
        # a PROGRAM that ends in its BINARY is compiled already: tinygrad loads and runs it
        sink = UOp.sink(arg=KernelInfo(name, estimates=estimates))
        return UOp(Ops.PROGRAM, arg=info, src=(sink, UOp(Ops.LINEAR, src=params),
                                               UOp(Ops.SOURCE, arg=source),
                                               UOp(Ops.BINARY, arg=binary)))

    return program


@functools.cache
def _compile_c(source: str, target) -> bytes:
    """The object code tinygrad's clang compiler makes of C source for a CPU target."""
    from dataclasses import replace

    from tinygrad.renderer.cstyle import ClangRenderer

    return ClangRenderer(replace(target, renderer="CLANG")).compiler.compile_cached(source)


def _cpu_matmul_grads(grad: UOp, call: UOp) -> tuple:
    """Gradients for (out, x, W[, b]): none for the output buffer, then dx = g W and
    dW = gᵀ x. Each is cpu_matmul's product of copies transposed so that both sides' rows lie
    along memory, where it fits (tinygrad's own read W across memory for dx, and summed dW over
    all rows in one serial chain per output: docs/speed.md, Training, issue 33); else
    tinygrad's products."""
    g = Tensor(grad)
    _, x_in, w, *bias = (Tensor(u) for u in call.src[1:])
    x = x_in.reshape(*g.shape[:-1], w.shape[-1])  # (..., M, K): x came in as in_order found it
    if w.ndim == 2:  # one W for all of x's rows: dW and db sum over every one of them
        rows_g, rows_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # (R, N), (R, K)
    else:
        rows_g, rows_x = g, x
    flip = lambda t: t.transpose(-2, -1).contiguous()
    if cpu_matmul_fits(g, w_t := flip(w)):
        dx = cpu_matmul(g, w_t)  # (..., M, N) by (..., K, N): (..., M, K)
        dw = cpu_matmul(flip(rows_g), flip(rows_x))  # (..., N, R) by (..., K, R): (..., N, K)
    else:
        dx, dw = TINYGRAD_DOT(g, w), TINYGRAD_DOT(rows_g.transpose(-2, -1), rows_x)
    return (None, dx.reshape(x_in.shape).uop, dw.uop, *[rows_g.sum(0).uop] * len(bias))


def cpu_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ (+ b) for x (..., K) and weight (N, K), or x (..., M, K) and weight (..., N, K)
    entry by entry (attention's q kᵀ per head), as one hand-written kernel, split over the
    cores by entries, by rows of x, or for a row or two (decoding) by rows of W. tinygrad 0.14's
    CPU code splits vector arithmetic into single lanes, so a product loads 4 floats at a time
    and multiplies them one by one; this kernel keeps tiles of 8-lane sums in registers (its
    speed against tinygrad's and NumPy's BLAS: docs/speed.md, "A hand-written matmul kernel").
    Compiled with tinygrad's own clang compiler (its disk cache keeps it), loaded as a tinygrad
    program, so TinyJit and CPUGraph replay it like any other kernel."""
    from tinygrad import Device
    from tinygrad.helpers import NUM_CPU_THREADS
    from tinygrad.renderer import Estimates

    *lead, M, K = x.shape
    # one W for all of x's rows (a Linear): they are one matrix of rows, however x is shaped
    batch, M = (1, math.prod(x.shape[:-1])) if weight.ndim == 2 else (math.prod(lead), M)
    N = weight.shape[-2]
    flops = 2 * batch * M * N * K
    weight_bytes = batch * N * K * weight.dtype.itemsize
    # handing a chunk to a helper thread and back has a fixed cost (docs/speed.md, Training):
    # below 2 MFLOP, or 1 MB of weights for a row or two, it outweighs the work it shares
    cores, by, threads = 1, 0, NUM_CPU_THREADS.value
    if flops >= 1 << 21 or weight_bytes >= 1 << 20:
        if batch >= threads:
            cores, by = threads, 0  # the batch's entries (attention's heads)
        elif M >= 3 * threads:
            cores, by = threads, 1  # the rows of x (a prompt's tokens)
        else:
            cores, by = min(threads, -(-N // 4)), 2  # the rows of W (decoding's one row)
    half = weight.dtype.itemsize == 2
    c_type = {2: "__fp16", 4: "float"}
    name = (f"matmul_{batch}_{M}_{N}_{K}" + ("_half" if half else "")
            + ("" if bias is None else f"_bias{bias.dtype.itemsize * 8}"))
    wplace, w_in, grads = f"(long)bt * {N * K}", weight, _cpu_matmul_grads
    if weight.ndim > 2 and (view := strided(weight)) is not None:
        base, shape, steps, offset = view
        if steps[-1] == 1 and (steps[-2] == K or N == 1) and base.numel() > weight.numel():
            # each entry's rows lie along memory in one block, the entries apart: a slice of
            # the KV cache (prefill's keys), read where it lies, not copied out first. Its
            # gradient would be the whole cache's: none is offered
            w_in, grads = base, None
            wplace = entry_place(list(weight.shape[:-2]), steps, offset, "bt")
            name += "_strided"
        elif half and not lies_in_order(shape, steps):
            # a float16 view that must be copied (prefill's values, read across the cache) is
            # copied as float32, the same values: tinygrad's LLVM code has no float16, and
            # rounding each one back to float16 in integer steps cost 3x the widening
            w_in, half, name = weight.float(), False, name + "_widened"
    source = MATMUL_C.substitute(
        name=name, batch=batch, M=M, N=N, K=K, cores=cores, mr=min(M, 3), by=by, wplace=wplace,
        wtype=c_type[w_in.dtype.itemsize], half=int(half),
        bias="" if bias is None else f" const {c_type[bias.dtype.itemsize]} *restrict b,",
        add_bias=" + b[n + j]" if bias is not None else "",
        add_bias_n=" + b[n]" if bias is not None else "")
    inputs = [t.contiguous() for t in (in_order(x), w_in, bias) if t is not None]
    moved = 4 * batch * (M * K + M * N) + weight_bytes
    program = _c_program(name, source, Device[x.device], 1 + len(inputs), cores,
                         Estimates(ops=flops, lds=moved, mem=moved))
    out = Tensor.empty(*x.shape[:-1], N, device=x.device)
    return out.custom_kernel(*inputs, fxn=program, grad_fxn=grads)[0]


def _one(s) -> bool:
    return isinstance(s, int) and s == 1


def reshaped_steps(shape: list, steps: list[int], new: list) -> list[int] | None:
    """The steps of a view (shape, steps) reshaped to new, or None where the reshape would need
    a copy: axes may split or merge only where they lie in order in memory (as NumPy decides
    whether a reshape is a view). A symbolic axis must stay whole."""
    old = [(s, step) for s, step in zip(shape, steps) if not _one(s)]
    kept = [(k, s) for k, s in enumerate(new) if not _one(s)]
    out, i, j = [0] * len(new), 0, 0
    while i < len(old) and j < len(kept):
        (size, step), (k, want) = old[i], kept[j]
        if size is want:  # the same axis, symbolic or whole
            out[k], i, j = step, i + 1, j + 1
            continue
        if not isinstance(size, int) or not isinstance(want, int):
            return None
        group_old, group_new = [i], [j]  # the axes on each side that hold the same elements
        while size != want:
            if size < want:
                i += 1
                if i == len(old) or not isinstance(old[i][0], int):
                    return None
                group_old.append(i)
                size *= old[i][0]
            else:
                j += 1
                if j == len(kept) or not isinstance(kept[j][1], int):
                    return None
                group_new.append(j)
                want *= kept[j][1]
        if any(old[a][1] != old[b][1] * old[b][0] for a, b in zip(group_old, group_old[1:])):
            return None  # the old axes do not lie in order: the reshape is a copy
        step = old[group_old[-1]][1]
        for jj in reversed(group_new):
            out[kept[jj][0]] = step
            step *= kept[jj][1]
        i, j = i + 1, j + 1
    return out if i == len(old) and j == len(kept) else None


def strided(t: Tensor) -> tuple[Tensor, list, list[int], int] | None:
    """t as a view of a tensor of whole sizes, read in place: (that tensor, t's shape, the
    step in it for each of t's axes, where t starts), when the view is made of shrinks,
    permutes and reshapes that need no copy (a slice of the KV cache; q, k and v's slices of
    c_attn's output, split into heads). Else None."""
    from tinygrad.uop.ops import Ops

    views, u = [], t.uop
    while u.op in (Ops.PERMUTE, Ops.RESHAPE, Ops.SHRINK, Ops.CONTIGUOUS_BACKWARD):
        if u.op is not Ops.CONTIGUOUS_BACKWARD:  # the same values, going forward
            views.append(u)
        u = u.src[0]
    if not all(isinstance(s, int) for s in u.shape):
        return None
    shape, steps, offset = list(u.shape), [math.prod(u.shape[i + 1:]) for i in range(u.ndim)], 0
    for view in reversed(views):
        if view.op is Ops.PERMUTE:
            shape, steps = [shape[i] for i in view.arg], [steps[i] for i in view.arg]
        elif view.op is Ops.SHRINK:
            starts = [start for start, _ in view.marg]
            if not all(isinstance(s, int) for s in starts):
                return None
            offset += sum(s * step for s, step in zip(starts, steps))
            shape = list(view.shape)
        else:
            if (steps := reshaped_steps(shape, steps, list(view.shape))) is None:
                return None
            shape = list(view.shape)
    return Tensor(u), shape, steps, offset


def entry_place(lead: list[int], steps: list[int], offset: int, index: str) -> str:
    """Where entry `index` (a C expression) of a batch with leading axes lead starts, in a view
    with these steps that starts at offset (strided): a C expression."""
    return " + ".join([str(offset)] + [
        f"(long)({index} / {math.prod(lead[i + 1:])} % {n}) * {step}"
        for i, (n, step) in enumerate(zip(lead, steps)) if n > 1])


def lies_in_order(shape: list, steps: list[int]) -> bool:
    """Does a view with these steps (strided's) read its elements one after another?"""
    return all(step == math.prod(shape[i + 1:]) for i, step in enumerate(steps) if shape[i] != 1)


def in_order(t: Tensor) -> Tensor:
    """For a kernel that reads t's elements in order from a flat pointer: t, or where t is a
    contiguous copy of a view that already lies in order at the start of another tensor (the
    heads' outputs side by side after a transpose of an axis of 1), that tensor, shaped as it
    is. tinygrad 0.14 copies such a view, even a reshape of a kernel's output."""
    from tinygrad.uop.ops import Ops

    if t.uop.op is not Ops.CONTIGUOUS or (view := strided(Tensor(t.uop.src[0]))) is None:
        return t
    base, shape, steps, offset = view
    if not all(isinstance(s, int) for s in shape) or base.numel() != t.numel() or offset:
        return t
    return base if lies_in_order(shape, steps) else t


# One decoding query against the KV cache: q kᵀ (each cached key a row along memory) or att v
# (the cached values summed with att's weights, row by row), read where the cache holds them.
# The number of cached positions S changes every step: it is an argument (the step's position
# variable), not part of the compiled kernel, so one kernel serves the whole context.
CACHE_C = string.Template(VECTORS_C + r"""
void $name(float *restrict out, const float *restrict x, const W *restrict w, int core_id,
           int $var) {
  enum { E = $entries, N = $N, K = $K, CORES = $cores, PER = (E + CORES - 1) / CORES };
  const long S = $S;  /* the cached positions read this step */
  for (int e = core_id * PER; e < E && e < (core_id + 1) * PER; e++) {
    const W *we = w + $wplace;
    const float *xe = x + $xplace;
#if $rows  /* scores: q against each cached key, S rows $step floats apart */
    float *oe = out + (long)e * $ostride;
    for (long s = 0; s < S; s++) {
      const W *ws = we + s * $step;
      f8 acc[4] = {0};
      int k = 0;
      for (; k + 32 <= K; k += 32)
        for (int u = 0; u < 4; u++) acc[u] += load8(xe + k + 8 * u, 8) * loadw8(ws + k + 8 * u, 8);
      for (; k + 8 <= K; k += 8) acc[0] += load8(xe + k, 8) * loadw8(ws + k, 8);
      if (K % 8) acc[0] += load8(xe + k, K % 8) * loadw8(ws + k, K % 8);
      oe[s] = sum8((acc[0] + acc[2]) + (acc[1] + acc[3]));
    }
#else  /* values: the S cached rows, $step floats apart, summed with the weights in x */
    float *oe = out + (long)e * N;
    f8 acc[(N + 7) / 8] = {0};
    for (long s = 0; s < S; s++) {
      const W *ws = we + s * $step;
      f8 a = xe[s];
      for (int j = 0; j < N / 8; j++) acc[j] += a * loadw8(ws + 8 * j, 8);
      if (N % 8) acc[N / 8] += a * loadw8(ws + N - N % 8, N % 8);
    }
    for (int j = 0; j < N / 8; j++) __builtin_memcpy(oe + 8 * j, &acc[j], 8 * sizeof(float));
    if (N % 8) __builtin_memcpy(oe + N - N % 8, &acc[N / 8], (N % 8) * sizeof(float));
#endif
  }
}
""")


def cache_matmul(x: Tensor, weight: Tensor) -> Tensor | None:
    """x Wᵀ per entry of a batch for one row of x, x (..., 1, K) and weight (..., N, K), when
    N or K is a symbolic count of cached positions (a decoding step's q kᵀ or att v) and weight
    is a view of the KV cache (strided): as one hand-written kernel that reads the cache where
    it lies, with the count an argument. tinygrad 0.14's own kernels over a symbolic length
    read the keys at a fraction of the memory's speed (docs/speed.md); copying them out of the
    cache first costs what the product would save. None where it does not apply."""
    from tinygrad import Device, dtypes
    from tinygrad.helpers import NUM_CPU_THREADS
    from tinygrad.renderer import Estimates
    from tinygrad.uop.ops import Ops

    *lead, N, K = weight.shape
    symbolic = [s for s in (N, K) if not isinstance(s, int)]
    if (len(symbolic) != 1 or x.ndim != weight.ndim or x.ndim < 3 or x.shape[-2] != 1
            or tuple(x.shape[:-2]) != tuple(lead) or not all(isinstance(s, int) for s in lead)
            or not (x.shape[-1] is K or x.shape[-1] == K)):
        return None
    if dtypes.float32 != x.dtype or weight.dtype not in (dtypes.float32, dtypes.float16):
        return None
    if not isinstance(x.device, str) or x.device != weight.device or _c_device(x.device) is None:
        return None
    count = symbolic[0]
    if len(variables := count.variables()) != 1 or (view := strided(weight)) is None:
        return None
    base, _, steps, offset = view
    rows = isinstance(K, int)  # q kᵀ: the keys are W's rows; else att v: the values are its columns
    if steps[-1 if rows else -2] != 1:
        return None
    var, most = variables[0], count.vmax
    entries = math.prod(lead)

    if rows:  # q, read where c_attn wrote it when its features lie along memory
        q = strided(x)
        x, xplace = ((q[0], entry_place(lead, q[2], q[3], "e")) if q and q[2][-1] == 1
                     else (x, f"(long)e * {K}"))
    else:  # att (..., 1, S) written into a buffer of the longest S, its S weights alone: by
        # the softmax's own kernel, not as a copy of its contiguous output
        if x.uop.op is Ops.CONTIGUOUS:
            x = Tensor(x.uop.src[0])
        whole = Tensor.empty(*x.shape[:-1], most, device=x.device)
        whole.shrink(tuple((0, s) for s in x.shape[:-1]) + ((0, count),)).assign(x)
        x, xplace = whole, f"(long)e * {most}"
    cores = min(NUM_CPU_THREADS.value, entries)
    half = weight.dtype.itemsize == 2
    name = (f"cache_{'scores' if rows else 'values'}_{entries}_{K if rows else N}_{most}"
            + ("_half" if half else ""))
    source = CACHE_C.substitute(
        wtype="__fp16" if half else "float", half=int(half),
        name=name, var=var.expr, entries=entries, N=0 if rows else N, K=K if rows else 0,
        cores=cores, S=count.render(), wplace=entry_place(lead, steps, offset, "e"),
        xplace=xplace, ostride=most, rows=int(rows), step=steps[-2] if rows else steps[-1])
    inputs = [x.contiguous(), base.contiguous()]
    moved = entries * most * ((K if rows else N) * weight.dtype.itemsize + 4)
    program = _c_program(name, source, Device[x.device], 3, cores, Estimates(
        ops=2 * entries * most * (K if rows else N), lds=moved, mem=moved), var)
    # scores: (..., 1, S) of a buffer for the longest S; values: (..., 1, N), which c_proj then
    # reads as it lies (in_order)
    out = Tensor.empty(*lead, 1, most if rows else N, device=x.device)
    out = out.custom_kernel(*inputs, fxn=program)[0]
    return out.shrink(tuple((0, s) for s in (*lead, 1)) + ((0, count),)) if rows else out


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ + b for x (N, in) and weight (out, in), or per entry of a batch, x (..., T, d) and
    weight (..., S, d). By the fastest form here: cache_matmul for a decode step's attention,
    cpu_matmul where it fits, train_matmul when training elsewhere (2-D), else tinygrad's own
    product."""
    from tinygrad.helpers import TRAINING

    if not TRAINING and bias is None and (y := cache_matmul(x, weight)) is not None:
        return y
    elif cpu_matmul_fits(x, weight, bias):
        return cpu_matmul(x, weight, bias)
    elif TRAINING and x.ndim == 2:
        y = train_matmul(x, weight)
    else:
        y = TINYGRAD_DOT(x, weight.transpose(-2, -1))
    return y if bias is None else y + bias
