"""Run ``divmoe ARGS...`` in this process with one fault armed, for tests/test_faults.py.

    python tests/fault_child.py PHASE N -- train --out RUN ...

At the N-th time the process reaches PHASE it SIGKILLs itself (no handler, no cleanup, as a
power cut or the OOM killer would), or for ``wait`` blocks until the file named by the
environment variable DIVMOE_FAULT_GO exists. Phases:

* ``step``: inside an optimizer step, after the weights changed, before the step is counted
* ``eval``: in the middle of an evaluation (losses computed, expert-diversity probe not yet)
* ``ckpt-files``: during a checkpoint write, model.safetensors written, state.pt not yet
* ``ckpt-swap``: the newest checkpoint already moved to checkpoint.prev, the new one not
  yet renamed into place
* ``wait``: at the start of an evaluation (keeps the run, and its lock, alive)
* ``none``: no fault
"""

import os
import signal
import sys
import time
from pathlib import Path

phase, n = sys.argv[1], int(sys.argv[2])
assert sys.argv[3] == "--", sys.argv
args = sys.argv[4:]
reached = 0


def hit():
    global reached
    reached += 1
    if reached != n:
        return
    if phase == "wait":
        go = Path(os.environ["DIVMOE_FAULT_GO"])
        print(f"fault_child: waiting for {go}", file=sys.stderr, flush=True)
        while not go.exists():
            time.sleep(0.02)
        return
    os.kill(os.getpid(), signal.SIGKILL)


if phase == "step":
    import torch

    adamw_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = adamw_step(self, *a, **k)
        hit()
        return out

    torch.optim.AdamW.step = step
elif phase in ("eval", "wait"):
    import divmoe.train.loop as loop

    patched = "expert_vendi_by_layer" if phase == "eval" else "evaluate"
    original = getattr(loop, patched)

    def in_eval(*a, **k):
        hit()
        return original(*a, **k)

    setattr(loop, patched, in_eval)
elif phase == "ckpt-files":
    import divmoe.train.checkpoint as ckpt

    save_file = ckpt.save_file

    def write_weights(*a, **k):
        save_file(*a, **k)
        hit()

    ckpt.save_file = write_weights
elif phase == "ckpt-swap":
    import divmoe.train.checkpoint as ckpt

    replace = os.replace

    def rename(src, dst):
        if Path(dst).name == ckpt.CHECKPOINT:  # the new one's rename; .prev is already moved
            hit()
        return replace(src, dst)

    ckpt.os.replace = rename
elif phase != "none":
    sys.exit(f"fault_child: unknown phase {phase!r}")

from divmoe.cli import main  # noqa: E402

sys.exit(main(args))
