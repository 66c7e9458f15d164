"""Variable-length attention for packed rows (fx.training.attention): each sequence attends only to itself, as causal
attention over that sequence alone would. The kernels need a CUDA GPU; the choice of kernel is checked everywhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import has_cuda
from fx.training import attention
from test_speed import assert_same_training, train

LENGTHS = [5, 37, 1, 64, 130, 3]  # a single token, a block's width, and a row longer than two blocks


def per_sequence_reference(q, k, v, lengths, scale):
    """Causal SDPA over each sequence alone, in float64 on the CPU: the answer packed attention must give."""
    outs, start = [], 0
    for n in lengths:
        part = [t[start:start + n].transpose(0, 1).double().cpu() for t in (q, k, v)]  # (heads, n, dim)
        outs.append(torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True, scale=scale)
                    .transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_efficient_varlen_attends_within_each_sequence(dtype):
    """The memory-efficient kernel given sequence offsets: its output and its gradients for q, k and v equal causal
    attention over each sequence alone (float64 on the CPU), to the dtype's rounding."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    total, heads, dim = sum(LENGTHS), 4, 64
    q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    scale = dim ** -0.5
    out = attention.efficient_varlen_attn(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), scale=scale)
    grad = torch.randn(out.shape, device="cuda", dtype=dtype, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    expected = per_sequence_reference(q64, k64, v64, LENGTHS, scale)
    eq, ek, ev = torch.autograd.grad(expected, (q64, k64, v64), grad.double().cpu())
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    for got, want in ((out, expected), (dq, eq), (dk, ek), (dv, ev)):
        torch.testing.assert_close(got.double().cpu(), want, **tol)


@pytest.mark.gpu
def test_efficient_varlen_trains_like_the_masked_sdpa(write_experiment, tmp_path):
    """A tiny Llama trained 4 steps on packed rows (CUDA graphs off, then on) with the memory-efficient varlen kernel
    and with SDPA's block-diagonal mask: the same losses and adapter, to float32 rounding."""
    exact = "method.compute_dtype=float32"
    masked = train(write_experiment, tmp_path, "sdpa", exact, "method.attention=sdpa", "method.cuda_graphs=false")
    for graphed in ("false", "true"):
        packed = train(write_experiment, tmp_path, f"efficient-{graphed}", exact, "method.attention=varlen_efficient",
                       f"method.cuda_graphs={graphed}")
        assert_same_training(masked, packed, rtol=1e-3)


def test_varlen_refused_without_padding_free_or_a_gpu(write_experiment, tmp_path, capsys):
    from conftest import TINY_EXPERIMENT, TINY_ROWS
    from fx import cli

    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    base = ["run", str(path), "--set", f"experiment.output_dir={tmp_path / 'runs'}"]
    for choice in ("varlen", "varlen_efficient"):
        assert cli.main([*base, "--set", f"method.attention={choice}", "--set", "method.padding_free=false"]) == 2
        assert f'method.attention = "{choice}" needs method.padding_free = true' in capsys.readouterr().err
        if not has_cuda():
            assert cli.main([*base, "--set", f"method.attention={choice}"]) == 2
            assert f'method.attention = "{choice}" needs a CUDA GPU' in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


class Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """The operators that write a tensor's values into another: copies, fills, zeros."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(word in str(func) for word in ("copy", "fill", "zero", "clone", "contiguous")):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_packed_rows_reach_the_kernel_and_come_back_without_a_copy():
    """q as the attention module gives it (the projection's output viewed (1, heads, tokens, dim)) reaches the kernel
    as a view, and the kernel's (tokens, heads, dim) gradient reaches the projection as a view too."""
    tokens, heads, dim = 7, 4, 8
    projection = torch.randn(1, tokens, heads * dim, requires_grad=True)
    query = projection.view(1, tokens, heads, dim).transpose(1, 2)
    q = attention.packed(query)
    assert q.shape == (tokens, heads, dim) and q.is_contiguous()
    grad = torch.randn(tokens, heads, dim)  # the kernel's gradient, in its layout
    with Copies() as copies:
        q.backward(grad)
    assert copies.ops == []
    torch.testing.assert_close(projection.grad, grad.reshape(1, tokens, heads * dim), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, expected", [(torch.float16, "flash"), (torch.bfloat16, "flash"),
                                             (torch.float32, "efficient")])
def test_float32_rows_go_to_the_kernel_that_takes_them(monkeypatch, dtype, expected):
    """FlashAttention takes fp16 and bf16 only: with it chosen (fx_varlen), float32 rows (a float32 model's, or RoPE's
    float32 product under fp16 autocast) go to the memory-efficient kernel instead of failing in FlashAttention."""
    called = []

    def kernel(name):
        def run(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, **extra):
            called.append(name)
            return torch.zeros_like(q)
        return run

    monkeypatch.setattr(attention, "_varlen", lambda: (kernel("flash"), {"is_causal": True}, True))
    monkeypatch.setattr(attention, "efficient_varlen_attn", kernel("efficient"))
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention.NAME))
    tokens, heads, dim = 6, 4, 8
    query = torch.randn(1, heads, tokens, dim, dtype=dtype)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = attention.fx_varlen_attention(module, query, query, query, None, cu_seq_lens_q=cu, max_length_q=4)
    assert called == [expected] and out.shape == (1, tokens, heads, dim)
