"""Shared fixtures. Without a GPU, Triton kernels run under Triton's CPU interpreter (tests/test_triton_dispatch.py).
``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any
test module imports divmoe's kernels; with CUDA present the kernels compile for the GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def one_thread():
    """Tiny models step by step: one thread is faster, and does not spin against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
