"""Fusion guards: the number of kernels one decode step, and one training step, launch must not
grow.

Speed is measured by bench.py, not here; this only counts kernels, which does not depend on how
busy the machine is. A change that splits a fused kernel in two (an extra realize, a lost fusion)
shows up as a larger count. When a change lowers the count, lower the limit with it."""

from pathlib import Path

import numpy as np
from tinygrad import Context, Device, GlobalCounters, Tensor

import gpt
from generate import generate
from tasks import Reverse
from train import make_optimizer, make_train_step
from transformer import Transformer

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2" / "model.safetensors"

# Measured with tinygrad 0.14.0 (neither backend batches kernels into graphs): 2 layers of 16
# kernels, plus 7 for the embedding, the final LayerNorm and the output head; OpenCL adds a copy.
# gpt2 (12 layers) launches 199 the same way on the CPU. The limits were 48 and 49 while
# load_gpt2 left its weights as lazy copies from the file, which ran again at every step. On the
# CPU, 43 since each product is runtime.cpu_matmul's kernel (issue 34): tinygrad fused GELU into
# c_fc's product and the residual add into mlp.c_proj's, which now run as 2 kernels of their own
# per layer (gpt2: 222), a few microseconds each. 44 and 41 since the softmax stores its
# exponentials once (transformer.attention_weights; gpt2: 234), which a step at 900 tokens of
# context computed twice.
MAX_KERNELS_PER_DECODE_STEP = {"CPU": 44, "CL": 41}


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


# The reversal demo's training step (2 layers; forward, backward, clipping, AdamW), measured with
# tinygrad 0.14.0: 239 kernels, then 258 once each Linear's backward became matmul_backward (a
# transposed copy of W, and partial sums of dW added by one more kernel), as on CL. On the CPU
# 320 since every product, its gradients too, is runtime.cpu_matmul's kernel, whose dx and dW
# read transposed copies (W's, and the rows of x and of the gradient; docs/speed.md). 330 and 268
# since the causal mask is made once per layer and the softmax stores its exponentials (and the
# backward reads them): fewer operations, in more kernels (docs/speed.md).
MAX_KERNELS_PER_TRAIN_STEP = {"CPU": 330, "CL": 268}


def test_kernels_per_training_step_do_not_grow():
    task = Reverse()
    Tensor.manual_seed(0)
    model = Transformer(task.config)
    step = make_train_step(model, make_optimizer(model, task.lr))
    rng = np.random.default_rng(0)
    counts = []
    with Context(TRAINING=1):
        for _ in range(4):
            x, y = task.batch(rng, task.batch_size)
            before = GlobalCounters.kernel_count
            step(Tensor(x), Tensor(y), Tensor([task.lr]))[0].item()
            counts.append(GlobalCounters.kernel_count - before)
    # captured by the first call (jit_at_once; TinyJit alone, by the second), then replayed
    assert counts[2] == counts[3], f"replayed steps differ in kernel count: {counts}"
    limit = MAX_KERNELS_PER_TRAIN_STEP.get(Device.DEFAULT, 268)
    assert counts[3] <= limit, (
        f"a training step launches {counts[3]} kernels, more than {limit}: "
        "something that used to fuse no longer does")
    assert counts[3] > 100, f"only {counts[3]} kernels counted: is the counter still counting?"
