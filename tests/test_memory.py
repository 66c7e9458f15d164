"""The memory planner: component arithmetic against hand-computed sizes, budgets, refusal, auto, fx plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.cli import main
from fx.errors import ConfigError
from fx.plan import cost, fit
from fx.plan.gpus import GIB
from fx.plan.shapes import Architecture, Workload
from fx.training import budget

# The `random` source's "tiny" architecture: hidden 64, intermediate 176, 2 layers, 4 heads, 2 kv heads, vocab 2048.
TINY = Architecture(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=2048, model_type="llama")
QV = Workload(micro_batch=2, seq_len=16, gradient_checkpointing=True, lora_r=8, lora_targets=("q_proj", "v_proj"),
              lora_dropout=0.1, compute_dtype="float16")


def components(plan):
    return {c.name: c.bytes for c in plan.components}


def test_architecture_from_the_random_sources_config():
    from fx.sources.architectures import llama_config

    assert Architecture.from_config(llama_config("tiny")) == TINY


def test_liger_kernels_keep_fewer_activations():
    from dataclasses import replace

    from fx.training.kernels import expects_liger

    plain = replace(QV, gradient_checkpointing=False)
    # per token and layer, d = 2: the two RMSNorms keep a float16 input and a float32 reciprocal norm instead of a
    # float32 input (2 x 4h -> 2 x (2h + 4): 512 -> 264 bytes), the SwiGLU the gate and up projections only
    # (3 x 2 x 176 -> 2 x 2 x 176: 1056 -> 704); 32 tokens, 2 layers
    fused = replace(plain, liger=True)
    saved = cost.saved_activation_bytes(TINY, plain, 0) - cost.saved_activation_bytes(TINY, fused, 0)
    assert saved == (248 + 352) * 32 * 2
    assert not expects_liger("auto", "llama")  # no CUDA GPU here: the planner counts the model's own layers


def test_tiny_components_match_hand_computed_sizes():
    c = components(cost.plan(TINY, QV))
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x176 = 46,080 weights; 2 layers
    assert c["4-bit weights"] == 92_160 / 2
    assert c["quantisation constants"] == 92_160 / 64 * 4
    # embeddings and lm_head 2048 x 64 x 2 bytes each, 5 norms of 64 x 2 bytes
    assert c["16-bit modules"] == 2 * 2048 * 64 * 2 + 5 * 64 * 2
    # LoRA r=8: q 8 x (64+64) + v 8 x (64+32) per layer; fp32 under fp16 mixed precision
    assert c["LoRA parameters"] == 2 * (8 * 128 + 8 * 96) * 4
    assert c["LoRA gradients"] == 0  # rebuilt during backward, not alive at its peak without accumulation
    assert c["optimizer states"] == 3584 * 8  # every LoRA matrix is below bitsandbytes' paging threshold
    # checkpointing keeps each layer's fp16 input: 2 layers x 64 x 2 bytes x 32 tokens
    assert c["activations"] == 2 * 64 * 2 * 32
    # with 32 tokens the LM head's logit tile (32 x 32768 x 2) outweighs one layer's backward
    assert c["logits and loss"] == 32 * 64 * (2 + 4 + 2) + 32 * 32768 * 2
    assert c["backward working set"] == 0
    assert c["dequantised weight"] == 64 * 176 * 2
    assert c["CUDA context"] == cost.CUDA_CONTEXT_GIB * GIB


def test_layer_activation_bytes_by_hand():
    # norms 2 x 4h; attention q, k, v (grouped kv heads are repeated to h), output: 4 x 2 x 64, log-sum-exp 4 x 4;
    # MLP 3 x 2 x 176; LoRA q and v: mask + dropped input (1 + 2) x 64 and r x 2 each
    expected = 8 * 64 + (4 * 2 * 64 + 16) + 3 * 2 * 176 + 2 * (3 * 64 + 2 * 8)
    assert cost.layer_activation_bytes(TINY, QV) == expected == 2512
    no_dropout = replace(QV, lora_dropout=0.0)
    assert cost.layer_activation_bytes(TINY, no_dropout) == expected - 2 * 3 * 64 + 2 * 64  # one shared input


def test_the_fused_mlp_keeps_gate_and_up_and_not_the_down_projections_input():
    all_linear = replace(QV, lora_dropout=0.0, lora_targets=("all-linear",))
    stock = cost.layer_activation_bytes(TINY, all_linear)
    # the SwiGLU's output (2 x 176) is neither kept by the MLP nor by the down projection's adapter
    assert cost.layer_activation_bytes(TINY, replace(all_linear, fused_mlp=True)) == stock - 2 * 2 * 176
    liger = replace(all_linear, liger=True)
    assert cost.layer_activation_bytes(TINY, replace(liger, fused_mlp=True)) == (
        cost.layer_activation_bytes(TINY, liger) - 2 * 176)
    # with dropout on the adapters, or without an adapted down projection, nothing changes
    for work in (replace(all_linear, lora_dropout=0.1), QV):
        assert cost.layer_activation_bytes(TINY, replace(work, fused_mlp=True)) == cost.layer_activation_bytes(
            TINY, work)


def test_checkpointing_and_accumulation_change_the_right_components():
    on = cost.plan(TINY, replace(QV, seq_len=2048, micro_batch=8))
    off = cost.plan(TINY, replace(QV, seq_len=2048, micro_batch=8, gradient_checkpointing=False))
    assert components(off)["activations"] == 2 * 2512 * 8 * 2048
    assert components(on)["activations"] < components(off)["activations"]
    accumulated = cost.plan(TINY, replace(QV, gradient_accumulation=4))
    assert components(accumulated)["LoRA gradients"] == components(accumulated)["LoRA parameters"]


def test_double_quant_and_totals():
    c = components(cost.plan(TINY, replace(QV, double_quant=True)))
    blocks = 92_160 / 64
    assert c["quantisation constants"] == blocks + blocks / 256 * 4
    p = cost.plan(TINY, QV)
    assert p.total == pytest.approx(sum(x.bytes for x in p.components))
    assert p.total - p.reserved == pytest.approx(cost.CUDA_CONTEXT_GIB * GIB)


def test_paged_optimizer_states_sit_outside_the_allocator():
    from fx.sources.architectures import llama_config

    arch = Architecture.from_config(llama_config("llama2-7b"))
    p = cost.plan(arch, Workload(4, 1024, True, 64, ("q_proj", "v_proj"), 0.1))
    c = components(p)
    # r=64 on q and v: 33.5M LoRA weights, every matrix above 1e5 elements, 8 bytes each in unified memory
    assert c["paged optimizer states"] == 32 * 2 * 64 * (4096 + 4096) * 8 == 0.25 * GIB
    assert c["optimizer states"] == 0
    assert p.reserved == pytest.approx(p.total - 0.25 * GIB - cost.CUDA_CONTEXT_GIB * GIB)


def test_suggestions_each_fit_and_auto_keeps_the_effective_batch():
    big = replace(QV, micro_batch=64, seq_len=2048, gradient_checkpointing=False, gradient_accumulation=1,
                  keys={"micro_batch": "method.micro_batch_size",
                        "gradient_accumulation": "method.gradient_accumulation_steps",
                        "gradient_checkpointing": "method.gradient_checkpointing", "seq_len": "data.max_length",
                        "lora_r": "method.lora.r"})
    budget = 1.5 * GIB
    assert cost.plan(TINY, big).total > budget
    options = fit.suggestions(TINY, big, budget)
    assert options and all(o.plan.total <= budget for o in options)
    assert any("method.gradient_checkpointing=true" in o.overrides for o in options)
    chosen = fit.auto_micro_batch(TINY, big, budget)
    assert chosen.micro_batch * chosen.gradient_accumulation == 64
    assert cost.plan(TINY, chosen).total <= budget
    assert cost.plan(TINY, replace(chosen, micro_batch=chosen.micro_batch * 2)).total > budget


def test_allocator_fraction_leaves_room_for_what_the_allocator_cannot_see():
    p = cost.plan(TINY, QV)
    total = 80 * GIB
    fraction = fit.allocator_fraction(p, 14.5 * GIB, total)
    assert fraction * total == pytest.approx(14.5 * GIB - p.outside_allocator)
    assert fit.allocator_fraction(p, 100 * GIB, total) is None


def test_budget_section_is_validated(write_experiment):
    path = write_experiment(TINY_EXPERIMENT + '\n[budget]\ngpu = "t5"\n', TINY_ROWS)
    with pytest.raises(ConfigError, match="budget.gpu: value error, unknown GPU 't5'"):
        config.load(path)
    for extra, message in (('gpu = "t4"\nvram_gib = 10.0', "not both"), ("auto = true", "auto needs a budget")):
        path = write_experiment(TINY_EXPERIMENT + f"\n[budget]\n{extra}\n", TINY_ROWS)
        with pytest.raises(ConfigError, match=message):
            config.load(path)


def test_fx_plan_reference_recipe_fits_a_t4_offline(capsys):
    assert main(["plan", str(ROOT / "experiments" / "llama2_qlora.toml"), "--budget", "t4"]) == 0
    out = capsys.readouterr().out
    assert "built-in architecture table (llama2-7b" in out  # the hf config came from the table, not the hub
    assert "fits the t4 budget" in out and "headroom" in out
    assert main(["plan", str(ROOT / "experiments" / "llama2_qlora.toml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["budget"] == "t4" and data["gpus"]["t4"]["fits"]
    # gradient_checkpointing = "auto" spends the T4's memory on recomputing less, within its share of the budget
    assert 10 < data["total_gib"] <= 0.9 * 14.5


OVER = ["--set", "method.micro_batch_size=64", "--set", "data.max_length=2048", "--set", "budget.vram_gib=1.5"]


def test_fx_run_refuses_an_over_budget_plan_before_loading(tiny_experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FX_CACHE", str(tmp_path / "cache"))
    assert main(["run", str(tiny_experiment), *OVER]) == 2
    err = capsys.readouterr().err
    assert "over the 1.5 GiB budget" in err and "largest:" in err
    assert not (tmp_path / "cache").exists()  # no weights, not even a tokenizer, were made
    assert not (tmp_path / "runs").exists()
    # every suggested change, pasted as printed, fits
    suggested = [line.split("   ")[-1].split() for line in err.splitlines() if "--set" in line]
    assert suggested
    for flags in suggested:
        assert main(["plan", str(tiny_experiment), *OVER, *flags]) == 0, flags
        capsys.readouterr()


def test_budget_auto_picks_a_micro_batch_that_fits(tiny_experiment):
    exp = config.load(tiny_experiment, [*OVER[1::2], "budget.auto=true"])
    fitted = budget.fit(exp)
    s = fitted.exp.method.settings
    assert fitted.changes and s.micro_batch_size < 64
    assert s.micro_batch_size * s.gradient_accumulation_steps == 64
    assert fitted.fits and fitted.plan.total <= 1.5 * GIB


@pytest.mark.parametrize("name", ["llama2_qlora.toml", "llama2_qlora_bench.toml", "llama2_dpo_bench.toml"])
def test_shipped_experiments_validate(name):
    exp = config.load(ROOT / "experiments" / name)
    assert exp.budget.gpu == "t4" and budget.plan_experiment(exp).fits


def test_a_method_without_a_workload_runs_unplanned_unless_a_budget_needs_it(tiny_experiment, register_plugin, capsys):
    import fx
    from fx.training import sft

    class Unplanned(fx.QLoraMethod):
        class Settings(fx.QLoraMethod.Settings, fx.training.PackingSettings):
            pass

        def trainer(self, model, tokenizer, rows, session):
            return sft.trainer(self, model, tokenizer, rows, session)

        def workload(self, max_length, bf16=None):
            return None

    class Plugin:
        @fx.hookimpl
        def fx_register_methods(self, register):
            register("unplanned", Unplanned)

    register_plugin(Plugin(), "unplanned-method")
    assert budget.fit(config.load(tiny_experiment, ["method.name=unplanned"])) is None
    assert main(["plan", str(tiny_experiment), "--set", "method.name=unplanned", "--budget", "t4"]) == 2
    assert "can't be planned" in capsys.readouterr().err


def test_out_of_memory_in_training_ends_the_run_with_one_line_and_a_summary(tiny_experiment, hungry_method, capsys):
    assert main(["run", str(tiny_experiment), "--set", "method.name=hungry", "--set", "stages.evaluate.enabled=false",
                 "--set", "stages.generate.enabled=false"]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory at step 1" in err and "planned" in err and "fx run --resume" in err
    summary = json.loads(next((tiny_experiment.parent / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "out_of_memory" and "out of GPU memory" in summary["error"]
    assert summary["memory_plan"]["total_gib"] > 0  # the plan is recorded next to the (here absent) peak


def test_a_config_the_planner_cant_read_is_a_clear_refusal():
    """A config that names its shapes otherwise (GPT-2's n_embd, n_layer) is refused by the planner in a line
    (``fx plan`` exits 2 with it; ``fx run`` without a budget goes on unplanned), not an AttributeError."""
    from transformers import GPT2Config

    from fx.errors import UserError
    from fx.plan.shapes import Architecture

    with pytest.raises(UserError, match="the memory planner can't read a 'gpt2' config: .*intermediate_size"):
        Architecture.from_config(GPT2Config())
