"""torch.profiler tables of 3 training steps of the default MoE model and its dense twin
(docs/benchmarks.md, "Training tokens/s"). Run under `flock /tmp/divmoe-heavy.lock`."""
import torch
from torch.profiler import profile, ProfilerActivity, record_function
from divmoe.bench.train import timed_step
from divmoe.bench.measure import _RouterRange
from divmoe.models import MoETransformer
from divmoe.train import load_config
from divmoe.train.loop import build_optimizer
torch.set_num_threads(2)
cfg = load_config()
tokens = torch.randint(0, 256, (32, 129), generator=torch.Generator().manual_seed(0))
for moe in (True, False):
    cfg.model.moe = moe
    torch.manual_seed(0)
    m = MoETransformer(cfg.model, cfg.moe); opt = build_optimizer(m, cfg)
    hooks = [_RouterRange(b.mlp.router) for b in m.blocks if b.is_moe]
    for _ in range(2):
        timed_step(m, opt, tokens, 1.0)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            timed_step(m, opt, tokens, 1.0)
    print("=== moe" if moe else "=== dense")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
    ka = {e.key: e for e in p.key_averages()}
    for r in ("divmoe.router", "divmoe.dispatch", "divmoe.experts", "divmoe.combine"):
        if r in ka: print(r, "fwd cpu total ms/step", ka[r].cpu_time_total / 3e3)
