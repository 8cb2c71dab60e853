import sys, time, os
sys.path.insert(0, "/work/main")
import numpy as np
from tinygrad import Tensor, Context, GlobalCounters, Device
import progcache
import transformer as tr, tasks
which = sys.argv[1] if len(sys.argv) > 1 else "reverse"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 15
if which == "reverse":
    task = tasks.Reverse()
elif which == "grok":
    task = tasks.Grokking() if hasattr(tasks, "Grokking") else None
cfg = task.config
Tensor.manual_seed(0)
t0 = time.perf_counter()
model = tr.Transformer(cfg)
opt = tr.make_optimizer(model, task.lr)
step = tr.make_train_step(model, opt)
rng = np.random.default_rng(0)
times = []; kc = []
with Context(TRAINING=1):
    for i in range(n):
        x, y = task.batch(rng, task.batch_size)
        t = time.perf_counter(); k0 = GlobalCounters.kernel_count
        loss, norm = step(Tensor(x), Tensor(y), Tensor([1e-3]))
        l = loss.item()
        times.append(time.perf_counter() - t); kc.append(GlobalCounters.kernel_count - k0)
        if i < 3: print(f"step {i}: {times[-1]:.2f}s kernels {kc[-1]} loss {l:.4f}", flush=True)
print(Device.DEFAULT, "setup+first3", f"{time.perf_counter()-t0-sum(times[3:]):.2f}s", "steady ms", f"{1000*np.median(times[5:]):.1f}", "kernels", kc[-1], "loss", l)
