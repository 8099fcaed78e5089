"""The CUDA path of the layer and the model (skipped without a GPU: it needs the hardware).

- the layer on CUDA, every fast dispatch (grouped, triton when installed), against the
  reference loop on CPU, in float32 and bfloat16: outputs and every gradient;
- the model's loss and gradients on CUDA against CPU;
- torch.compile on CUDA matches eager;
- no host synchronisation in a forward except the row-count read (CUDA sync debug mode set
  to "error" around the forward, the one read let through and counted).

benchmarks/gpu_check.sh runs this file on a GPU machine.
"""

import copy
import importlib.util

import pytest
import torch
import torch._dynamo

from divmoe.layer import MoE, MoEConfig
from divmoe.models import MoETransformer
from divmoe.train import load_config, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRITON = importlib.util.find_spec("triton") is not None
FAST = ["grouped", "auto"] + (["triton"] if TRITON else [])
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32",
        "moe.expert_hidden=64", "moe.num_experts=8"]
LAYERS = {
    "stacked": dict(num_experts=8, top_k=2, expert_hidden=64),
    "hetero": dict(num_experts=4, top_k=2, expert_widths=[32, 64, 32, 96]),
    "null": dict(router="null_experts", num_experts=6, num_null_experts=2, top_k=2,
                 expert_hidden=48),
}
# float32 on the GPU vs CPU differs by summation order only; bf16 by rounding too.
TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2}


def _grads(module):
    return {n: p.grad.float().cpu() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", sorted(LAYERS))
@pytest.mark.parametrize("dispatch", FAST)
def test_layer_on_cuda_matches_cpu_reference(dispatch, layout, dtype):
    torch.manual_seed(0)
    kw = LAYERS[layout]
    gpu = MoE(64, MoEConfig(dispatch=dispatch, **kw)).to("cuda", dtype)
    gpu.router.float()  # bf16 logits would flip near-tied choices between the two devices
    ref = MoE(64, MoEConfig(dispatch="reference", **kw)).to(dtype)
    ref.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    ref.float()  # the reference in float32 on the same (rounded) weights
    x = torch.randn(4, 33, 64).to(dtype)
    g = torch.randn(4, 33, 64)
    x_gpu, x_ref = x.cuda().requires_grad_(), x.float().requires_grad_()
    out_gpu, out_ref = gpu(x_gpu), ref(x_ref)
    assert out_gpu.output.dtype == dtype
    assert torch.equal(out_gpu.stats.expert_ids.cpu(), out_ref.stats.expert_ids)
    ((out_gpu.output.float() * g.cuda()).sum() + out_gpu.aux_loss).backward()
    ((out_ref.output * g).sum() + out_ref.aux_loss).backward()
    tol = TOL[dtype]
    torch.testing.assert_close(out_gpu.output.float().cpu(), out_ref.output, atol=tol, rtol=tol)
    torch.testing.assert_close(x_gpu.grad.float().cpu(), x_ref.grad, atol=tol, rtol=tol)
    g_gpu, g_ref = _grads(gpu), _grads(ref)
    assert g_gpu.keys() == g_ref.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g_gpu[name] / scale, g_ref[name] / scale, atol=tol, rtol=tol,
                                   msg=name)


@pytest.mark.parametrize("dispatch", FAST)
def test_model_step_on_cuda_matches_cpu(dispatch):
    torch.manual_seed(1)
    cfg = load_config(None, TINY + [f"moe.dispatch={dispatch}"])
    cpu = MoETransformer(cfg.model, cfg.moe)
    gpu = copy.deepcopy(cpu).cuda()
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33))
    loss_cpu = train_step(cpu, torch.optim.SGD(cpu.parameters(), lr=0.0), [tokens]).loss
    loss_gpu = train_step(gpu, torch.optim.SGD(gpu.parameters(), lr=0.0), [tokens.cuda()]).loss
    torch.testing.assert_close(float(loss_gpu), float(loss_cpu), atol=1e-4, rtol=1e-4)
    g_cpu, g_gpu = _grads(cpu), _grads(gpu)
    for name in g_cpu:
        torch.testing.assert_close(g_gpu[name], g_cpu[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(not TRITON, reason="torch.compile (inductor) on CUDA generates Triton code")
@pytest.mark.parametrize("dispatch", FAST)
def test_compiled_model_on_cuda_trains_like_eager(dispatch):
    torch.manual_seed(2)
    torch._dynamo.reset()
    cfg = load_config(None, TINY + [f"moe.dispatch={dispatch}"])
    eager = MoETransformer(cfg.model, cfg.moe).cuda()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=gen).cuda()
        loss_e = train_step(eager, opt_e, [tokens], grad_clip=1.0).loss
        loss_c = train_step(compiled, opt_c, [tokens], grad_clip=1.0).loss
        torch.testing.assert_close(float(loss_c), float(loss_e), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_synchronises_only_to_read_the_row_counts(dispatch, dtype, monkeypatch):
    """With sync debug mode "error" any synchronising CUDA call in the forward raises; the
    row-count ``tolist`` (the one read dropless dispatch needs) runs with it switched off."""
    torch.manual_seed(4)
    cfg = load_config(None, TINY + [f"moe.dispatch={dispatch}"])
    model = MoETransformer(cfg.model, cfg.moe).to("cuda", dtype).train()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), device="cuda")
    model(tokens[:, :-1], tokens[:, 1:])  # warm-up: autotuning and first-call caches sync
    torch.cuda.synchronize()
    reads = []
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads.append(tuple(self.shape))
        torch.cuda.set_sync_debug_mode(0)
        try:
            return tolist(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(tokens[:, :-1], tokens[:, 1:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(reads) == len(model.moe_layers)
    assert torch.isfinite(out.loss).item()


def test_train_run_on_cuda_matches_cpu_and_resumes_on_cpu(tmp_path):
    """`divmoe train --set parallel.device=cuda`: the run's metrics follow the CPU run's (the
    same batches, summation order aside) and its checkpoint resumes on the CPU."""
    from divmoe.train import train

    run = TINY + ["train.steps=6", "train.eval_every=3", "train.batch_size=4",
                  "data.val_bytes_per_domain=1024", "train.threads=1"]
    cpu = train(tmp_path / "cpu", load_config(None, run), progress=False, report=False)
    gpu = train(tmp_path / "gpu", load_config(None, run + ["parallel.device=cuda"]),
                progress=False, report=False)
    for a, b in zip(cpu.metrics, gpu.metrics):
        assert b["val_bpb"] == pytest.approx(a["val_bpb"], abs=2e-3)
    longer = load_config(None, run + ["train.steps=9"])
    resumed = train(tmp_path / "gpu", longer, resume=True, progress=False, report=False)
    assert resumed.metrics[-1]["step"] == 9
