"""Checkpointing only the first N layers, planned: the activations of each layer left out, the peak of the
checkpointed layers' backward (with ``dequantize_once``'s weights), and ``gradient_checkpointing = "auto"`` choosing
the fewest layers that fit the budget, written into the experiment that runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.cli import main
from fx.errors import ConfigError
from fx.plan import cost, fit
from fx.plan.gpus import GIB
from fx.plan.shapes import Architecture, Workload
from fx.sources.architectures import llama_config
from fx.training import budget
from test_memory import components

BENCH = ROOT / "experiments" / "llama2_qlora_bench.toml"


ARCH = Architecture.from_config(llama_config("llama2-7b"))
WORK = Workload(4, 1024, True, 64, ("q_proj", "v_proj"), 0.1)  # 4,096 tokens: a layer's backward is the peak


def test_each_layer_left_out_keeps_its_activations():
    n = WORK.tokens
    first = components(cost.plan(ARCH, replace(WORK, checkpointed_layers=20)))
    # 20 layers keep their fp16 input, 12 everything
    assert first["activations"] == 20 * 4096 * 2 * n + 12 * cost.layer_activation_bytes(ARCH, WORK) * n
    assert first["backward working set"] == cost.layer_working_bytes(ARCH, WORK, False)  # a kept layer's
    none = cost.plan(ARCH, replace(WORK, checkpointed_layers=0))
    assert components(none) == components(cost.plan(ARCH, replace(WORK, gradient_checkpointing=False)))
    full = cost.plan(ARCH, replace(WORK, checkpointed_layers=32))
    assert components(full) == components(cost.plan(ARCH, WORK))  # the first 32 of 32: every layer
    one = components(cost.plan(ARCH, replace(WORK, checkpointed_layers=31)))
    assert one["activations"] > components(full)["activations"]


def test_dequantize_once_holds_a_layers_weights_in_its_recompute():
    stock, kept = cost.plan(ARCH, WORK), cost.plan(ARCH, replace(WORK, dequantize_once=True))
    assert components(stock)["dequantised weight"] == 11008 * 4096 * 2  # the largest, during its matmul
    assert components(kept)["dequantised weight"] == (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2  # all 7, fp16
    assert "kept from its recompute" in {c.name: c.note for c in kept.components}["dequantised weight"]
    # without checkpointing nothing is recomputed, nothing kept
    off = replace(WORK, gradient_checkpointing=False)
    assert components(cost.plan(ARCH, replace(off, dequantize_once=True))) == components(cost.plan(ARCH, off))


def test_fewest_checkpointed_layers_is_the_first_count_that_fits():
    arch = ARCH
    work = Workload(4, 1024, True, 64, ("q_proj", "v_proj"), 0.1, micro_batch_tokens=2048, persistent_grads=True,
                    dequantize_once=True)
    limit = 13 * GIB
    layers = fit.fewest_checkpointed_layers(arch, work, limit)
    assert 0 < layers < arch.layers
    assert cost.plan(arch, replace(work, checkpointed_layers=layers)).total <= limit
    assert cost.plan(arch, replace(work, checkpointed_layers=layers - 1)).total > limit
    assert fit.fewest_checkpointed_layers(arch, work, 100 * GIB) == 0
    assert fit.fewest_checkpointed_layers(arch, work, 2 * GIB) is None


def test_auto_under_a_budget_checkpoints_the_fewest_layers_and_says_so():
    exp = config.load(BENCH, ["method.gradient_checkpointing=auto"])
    fitted = budget.fit(exp)
    layers = fitted.exp.method.settings.gradient_checkpointing
    assert isinstance(layers, int) and not isinstance(layers, bool) and 0 < layers < 32
    assert fitted.changes == [f"method.gradient_checkpointing={layers}"]
    assert fitted.plan.work.checkpointed_layers == layers
    assert fitted.plan.total <= budget.AUTO_CHECKPOINTING_SHARE * fitted.budget_bytes
    again = config.load(BENCH, [f"method.gradient_checkpointing={layers - 1}"])
    assert budget.plan_experiment(again).plan.total > budget.AUTO_CHECKPOINTING_SHARE * fitted.budget_bytes
    # the resolved experiment, as a run directory records it, names the layers
    assert fitted.exp.resolved()["method"]["gradient_checkpointing"] == layers


def test_auto_without_a_budget_checkpoints_every_layer(write_experiment):
    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS), ["method.gradient_checkpointing=auto"])
    fitted = budget.fit(exp)
    assert fitted.exp.method.settings.gradient_checkpointing == "auto" and not fitted.changes
    assert cost.checkpointed_layers(fitted.plan.arch, fitted.plan.work) == 2


def test_fx_plan_shows_what_auto_chose(capsys):
    assert main(["plan", str(BENCH), "--set", "method.gradient_checkpointing=auto"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "gradient checkpointing on for the first" in out and "of 32 layers" in out


@pytest.mark.parametrize("value", ["-1", '"sometimes"', "1.5"])
def test_gradient_checkpointing_takes_a_bool_auto_or_a_layer_count(write_experiment, value):
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS), [f"method.gradient_checkpointing={value}"])


def test_out_of_memory_with_layers_left_out_suggests_checkpointing_them(tiny_experiment, hungry_method, capsys):
    assert main(["run", str(tiny_experiment), "--set", "method.name=hungry", "--set", "stages.evaluate.enabled=false",
                 "--set", "stages.generate.enabled=false", "--set", "method.gradient_checkpointing=1"]) == 1
    assert "--set method.gradient_checkpointing=true" in capsys.readouterr().err


def test_fused_adamw_keeps_its_states_inside_the_allocator():
    """torch's fused AdamW holds the same two float32 states as bitsandbytes' paged AdamW, but in the allocator:
    the plan moves them from unified memory into the reserved total, the whole unchanged."""
    paged = cost.plan(ARCH, WORK)
    fused = cost.plan(ARCH, replace(WORK, optim="adamw_torch_fused"))
    states = 32 * 2 * 64 * (4096 + 4096) * 8  # r=64 on q and v: 33.5M float32 LoRA weights, two states each
    assert components(fused)["optimizer states"] == states == components(paged)["paged optimizer states"]
    assert "paged optimizer states" not in components(fused)
    assert fused.reserved == pytest.approx(paged.reserved + states)
    assert fused.total == pytest.approx(paged.total)


def test_auto_checkpoints_fewer_layers_the_more_budget_there_is():
    work = Workload(4, 1024, True, 64, ("q_proj", "v_proj"), 0.1, micro_batch_tokens=2048, persistent_grads=True,
                    dequantize_once=True, optim="adamw_torch_fused")
    counts = [fit.fewest_checkpointed_layers(ARCH, work, gib * GIB) for gib in (8, 10, 12, 14, 20)]
    assert all(c is not None for c in counts)
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
