"""Count the host reads of tensors (``item``, ``float()``, ``bool()``, ``int()``, ``index``,
``tolist``) that Python code makes while a block runs: on a GPU each one waits for the
stream to drain."""

import collections
import contextlib
import traceback

import torch

READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")


@contextlib.contextmanager
def count_host_reads():
    """Yields a Counter of 'file:line method' → count, filled while the block runs."""
    where = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name, method):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            where[f"{caller.filename.rsplit('/src/', 1)[-1]}:{caller.lineno} {name}"] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield where
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
