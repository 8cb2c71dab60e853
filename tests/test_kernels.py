"""Fusion guard: the number of kernels one decode step launches must not grow.

Speed is measured by bench.py, not here; this only counts kernels, which does not depend on how
busy the machine is. A change that splits a fused kernel in two (an extra realize, a lost fusion)
shows up as a larger count. When a change lowers the count, lower the limit with it."""

from pathlib import Path

import numpy as np
from tinygrad import Device, GlobalCounters

import gpt
from transformer import generate

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2" / "model.safetensors"

# Measured with tinygrad 0.14.0 (neither backend batches kernels into graphs): 2 layers of 16
# kernels, plus 7 for the embedding, the final LayerNorm and the output head; OpenCL adds a copy.
# gpt2 (12 layers) launches 199 the same way on the CPU. The limits were 48 and 49 while
# load_gpt2 left its weights as lazy copies from the file, which ran again at every step.
MAX_KERNELS_PER_DECODE_STEP = {"CPU": 39, "CL": 40}


def test_kernels_per_decode_step_do_not_grow():
    model = gpt.load_gpt2("gpt2", FIXTURE)
    counts = []
    for _ in generate(model, np.array([[464, 2068, 7586]], dtype=np.int32), 8):
        counts.append(GlobalCounters.kernel_count)
    # between two yields lies exactly one decode step; from the third on, TinyJit replays it
    per_step = np.diff(counts)[2:]
    limit = MAX_KERNELS_PER_DECODE_STEP.get(Device.DEFAULT, 49)
    assert (per_step == per_step[0]).all(), f"decode steps differ in kernel count: {per_step}"
    assert per_step[0] <= limit, (
        f"a decode step launches {per_step[0]} kernels, more than {limit}: "
        "something that used to fuse no longer does")
    assert per_step[0] > 10, f"only {per_step[0]} kernels counted: is the counter still counting?"


