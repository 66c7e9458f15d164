"""The 4-bit LoRA levers (fx.training.lora4bit) and checkpointing of the first N layers (fx.training.checkpointing)
compute what peft's and bitsandbytes' stock linears compute, with fewer dequantisations: compared on the tiny Llama
in 4 bits on the CPU, one forward and backward at a time and over whole training runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.data.prepare import prepare
from fx.training import checkpointing, lora4bit, sft
from test_speed import assert_same_training, train


class Dequantisations(TorchDispatchMode):
    """Counts bitsandbytes' 4-bit operators: each gemm_4bit or dequantize_4bit dequantises one weight."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(("bitsandbytes.gemm_4bit", "bitsandbytes.dequantize_4bit")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def load(write_experiment, *sets):
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS), list(sets))
    method = exp.method.cls(exp.method.settings)
    model = method.attach(method.load_base(prepare(exp).source))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a non-zero adapter makes its gradients count
                param.normal_(0, 0.1, generator=generator)
    return model.train()


def step(model, dequantize_once: bool, fused_lora: bool, autocast=None):
    """One forward and backward on a fixed batch: the loss, the adapter's gradients, the dequantisations."""
    lora4bit.apply_levers(model, dequantize_once, fused_lora)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the same dropout masks
    with Dequantisations() as counted, torch.autocast("cpu", dtype=autocast or torch.float32,
                                                       enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    lora4bit.remove(model)
    return loss.item(), grads, counted.count


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointed", ["true", "1", "false"])
def test_levers_compute_what_the_stock_linears_compute(write_experiment, checkpointed, dropout):
    model = load(write_experiment, f"method.gradient_checkpointing={checkpointed}", f"method.lora.dropout={dropout}")
    weights = 2 * 7  # 2 layers x 7 linears
    layers = {"true": 2, "1": 1, "false": 0}[checkpointed]
    assert [layer.gradient_checkpointing for layer in checkpointing.decoder_layers(model)] == [True] * layers + [
        False] * (2 - layers)
    loss, grads, stock = step(model, False, False)
    # forward, backward, and the recompute of each checkpointed layer (less layer 0's q/k/v input gradient, which
    # nothing needs without checkpointing: their input comes from the frozen embeddings)
    assert stock == 2 * weights + layers * 7 - (3 if layers == 0 else 0)
    for levers in [(True, False), (False, True), (True, True)]:
        got_loss, got_grads, count = step(model, *levers)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        for name in grads:
            torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-5, atol=1e-7)
        if levers[0]:
            assert count == stock - layers * 7  # one dequantisation less per weight in each checkpointed layer
        else:
            assert count == stock


def test_fused_lora_under_autocast_matches_the_stock_path(write_experiment):
    """Under bfloat16 autocast (fp16 on a GPU) peft computes the adapter in the autocast dtype: so does the fused
    path, and it gives the stock path's loss and gradients to bfloat16's precision."""
    model = load(write_experiment, "method.compute_dtype=bfloat16", "method.gradient_checkpointing=true")
    loss, grads, _ = step(model, False, False, autocast=torch.bfloat16)
    got_loss, got_grads, _ = step(model, True, True, autocast=torch.bfloat16)
    assert got_loss == pytest.approx(loss, rel=1e-2)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], rtol=0.05, atol=0.02 * grads[name].abs().max())


def test_the_stock_forward_runs_where_the_levers_do_not_apply(write_experiment):
    model = load(write_experiment, "method.gradient_checkpointing=true")
    counts = lora4bit.apply_levers(model, True, True)
    # 14 LoRA linears, their 14 bitsandbytes bases, and the 2 MLPs whose down projection is adapted
    assert counts == {"dequantize_once": 14, "fused_lora": 14, "fused_mlp": 2}
    functions = (lora4bit.functions()[1], lora4bit.mlp_function())
    calls = {f: [] for f in functions}
    originals = {f: f.apply for f in functions}
    for f in functions:
        f.apply = lambda *args, _f=f: calls[_f].append(1) or originals[_f](*args)
    try:
        ids = torch.randint(0, 2000, (1, 8))
        with torch.no_grad():
            model(input_ids=ids)
        with model.disable_adapter():
            model(input_ids=ids).logits.sum().backward()
        assert not any(calls.values())  # no gradients, or the adapter off: peft's own forward
        model(input_ids=ids).logits.sum().backward()
        # forward and recompute: 6 linears a layer alone, the down projection inside the MLP's function
        assert [len(calls[f]) for f in functions] == [2 * 12, 2 * 2]
    finally:
        for f in functions:
            f.apply = originals[f]
    lora4bit.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """The distinct tensors autograd saves for backward (by storage), with their element counts."""

    def __init__(self):
        self.sizes = {}
        super().__init__(self.pack, lambda t: t)

    def pack(self, tensor):
        self.sizes[tensor.untyped_storage().data_ptr()] = tensor.numel()
        return tensor


def test_the_fused_mlp_keeps_gate_and_up_not_their_product(write_experiment):
    """The SwiGLU's output (tokens x intermediate) is what the down projection's adapter reads: the stock path keeps
    it for the backward beside the gate and up projections, the fused MLP recomputes it from them."""
    model = load(write_experiment)
    mlp = checkpointing.decoder_layers(model)[0].mlp
    intermediate = model.config.intermediate_size
    x = torch.randn(1, 6, model.config.hidden_size, requires_grad=True)
    kept = {}
    for fused in (False, True):
        lora4bit.apply_levers(model, False, fused)
        saved = SavedTensors()
        with saved:
            out = mlp(x)
        kept[fused] = list(saved.sizes.values()).count(6 * intermediate)  # activations of 6 tokens
        out.square().sum().backward()
        lora4bit.remove(model)
    # stock: silu's input (gate), the product's two factors (silu(gate), up) and the down adapter's input
    assert kept == {False: 4, True: 2}


def test_the_fused_mlp_keeps_and_gives_back_an_instance_forward_of_liger(write_experiment):
    model = load(write_experiment)
    mlp = checkpointing.decoder_layers(model)[0].mlp
    calls = []

    def liger_forward(self, x):  # what Liger binds into a SwiGLU MLP, from its own module
        calls.append(1)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    liger_forward.__module__ = "liger_kernel.transformers.swiglu"
    mlp.forward = liger_forward.__get__(mlp)
    assert lora4bit.apply_levers(model, True, True)["fused_mlp"] == 2
    ids = torch.randint(0, 2000, (1, 8))
    model(input_ids=ids).logits.sum().backward()
    assert calls == []  # training: the fused MLP
    with torch.no_grad():  # no gradients: the MLP's previous forward
        model(input_ids=ids)
    assert calls == [1]
    lora4bit.remove(model)
    assert mlp.__dict__["forward"].__func__ is liger_forward


def test_checkpointing_the_first_layers_survives_a_trainer_turning_it_off_and_on(write_experiment):
    """trl's DPOTrainer turns checkpointing off for its reference pass and on again: fx's choice of layers stays."""
    model = load(write_experiment, "method.gradient_checkpointing=1")
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in checkpointing.decoder_layers(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert [layer.gradient_checkpointing for layer in checkpointing.decoder_layers(model)] == [True, False]


def test_levers_train_exactly_like_the_stock_linears(write_experiment, tmp_path, monkeypatch):
    """Whole runs with checkpointing (all layers, then the first), stock against levered, and the same through the
    padded steps the CUDA graphs capture, with the T4's attention path (SDPA with a block mask). Without dropout:
    the padded steps draw their masks over more tokens (the step above compares dropout's masks)."""
    off = ("method.dequantize_once=false", "method.fused_lora=false")
    stock = train(write_experiment, tmp_path, "stock", "method.gradient_checkpointing=true", *off)
    levered = train(write_experiment, tmp_path, "levered", "method.gradient_checkpointing=true")
    assert_same_training(stock, levered)
    first = train(write_experiment, tmp_path, "first", "method.gradient_checkpointing=1")
    assert_same_training(stock, first)
    monkeypatch.setattr(sft, "uses_cuda_graphs", lambda settings: True)
    padded = train(write_experiment, tmp_path, "padded", "method.gradient_checkpointing=1", "method.attention=sdpa")
    assert_same_training(stock, padded)


def test_fused_adamw_trains_like_adamw(write_experiment, tmp_path):
    plain = train(write_experiment, tmp_path, "adamw", "method.optim=adamw_torch")
    fused = train(write_experiment, tmp_path, "fused", "method.optim=adamw_torch_fused")
    assert_same_training(plain, fused, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_fused_mlp_trains_like_the_stock_modules_on_a_gpu(write_experiment, tmp_path, dtype):
    """On a GPU, where Liger's SwiGLU kernels compute the activation (and Liger's own MLP forward is the stock path):
    4 steps with every lever against peft's and Liger's modules (fused_lora off), graphed, with the first layer
    checkpointed."""
    sets = (f"method.compute_dtype={dtype}", "method.gradient_checkpointing=1")
    stock = train(write_experiment, tmp_path, f"stock-{dtype}", *sets, "method.fused_lora=false")
    fused = train(write_experiment, tmp_path, f"fused-{dtype}", *sets)
    # in fp16 a few adapter weights differ by up to 1e-3 after 4 steps (9 of 1,408 on an H100): rounding flips the
    # sign of a near-zero gradient, and Adam moves that weight by up to a whole step (learning rate 0.01) the other
    # way. A quarter of a step bounds that; the losses are compared too, at 2e-3
    exact = dtype == "float32"
    assert_same_training(stock, fused, rtol=1e-4 if exact else 2e-3, atol=1e-5 if exact else 2.5e-3)


def test_the_fused_mlp_reads_gate_and_up_before_liger_overwrites_them(write_experiment, monkeypatch):
    """Liger's SwiGLU backward writes the gradients over its inputs: the fused MLP must recompute the product for the
    adapter's gradient first. Kernels with Liger's contract (in torch, as Liger's docs give them) stand in for its
    Triton ones, which need a GPU."""

    def forward(a, b):
        return a, b, (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)

    def backward(a, b, dc):
        sig = torch.sigmoid(a.float())
        silu = a.float() * sig
        db = dc.float() * silu
        da = dc.float() * (silu * (1 - sig) + sig) * b.float()
        a.copy_(da)
        b.copy_(db)
        return a, b

    model = load(write_experiment)
    _, stock, _ = step(model, True, True)
    monkeypatch.setattr(lora4bit, "_kernels", lambda a: (forward, backward))
    _, liger, _ = step(model, True, True)
    for name in stock:
        torch.testing.assert_close(liger[name], stock[name], rtol=1e-5, atol=1e-7)
