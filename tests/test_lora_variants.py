"""``[method.lora] variant`` and ``init`` through peft: each variant trains on the tiny 4-bit Llama and its adapter
reloads in plain peft with the logits training left; the planner's account of DoRA; the combinations that can't work
on a 4-bit base are refused before a run, naming the key; LoftQ on a GPU."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import TINY_EXPERIMENT, TINY_ROWS, StageObserver, logits
from fx import config, pipeline
from fx.cli import main
from fx.data.prepare import prepare
from fx.hooks import manager
from fx.plan import cost
from fx.training import budget
from fx.training.qlora import QLoraMethod

VARIANTS = ["lora", "dora", "rslora"]


def with_lora(text: str, **keys) -> str:
    return text.replace("[method.lora]", "[method.lora]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items()))


def train_probed(path, overrides=()):
    """The experiment at ``path`` trained (4 steps unless overridden), and the trained model's logits on a probe as
    it was saved: ``(experiment, run folder, {"logits", "model"})``."""
    seen = {}
    save = QLoraMethod.save

    def save_and_probe(self, model, folder):
        seen["logits"] = logits(model.eval(), StageObserver.PROBE.to(model.device))
        seen["model"] = model
        save(self, model, folder)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QLoraMethod, "save", save_and_probe)
        exp = config.load(path, ["method.max_steps=4", "stages.generate.enabled=false",
                                 "stages.evaluate.enabled=false", *overrides])
        folder = pipeline.execute(exp, manager.get())
    return exp, folder, seen


def reloaded_in_plain_peft(exp, folder):
    from peft import PeftModel

    method = exp.method.cls(exp.method.settings)
    base = method.load_base(exp.model.cls(exp.model.settings))  # 4-bit as in training (keep_4bit_layout)
    return PeftModel.from_pretrained(base, folder / "adapter").eval()


@pytest.fixture(scope="module", params=VARIANTS)
def trained(request, tmp_path_factory):
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    (root / "exp.toml").write_text(with_lora(TINY_EXPERIMENT, variant=variant).replace("{out}", str(root / "runs")))
    return variant, *train_probed(root / "exp.toml")


def test_each_variant_trains_and_reloads_in_plain_peft_with_the_same_logits(trained):
    variant, exp, folder, seen = trained
    saved = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"]) == (variant == "dora", variant == "rslora")
    reloaded = reloaded_in_plain_peft(exp, folder)
    probe = logits(reloaded, StageObserver.PROBE)
    assert torch.allclose(probe, seen["logits"], atol=1e-5)
    with reloaded.disable_adapter():
        assert not torch.allclose(logits(reloaded, StageObserver.PROBE), probe, atol=1e-3)  # the adapter trained
    layer = next(m for m in reloaded.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    r, alpha = exp.method.settings.lora.r, exp.method.settings.lora.alpha
    assert layer.scaling["default"] == pytest.approx(alpha / (r ** 0.5 if variant == "rslora" else r))
    assert ("default" in layer.lora_magnitude_vector) == (variant == "dora")


def test_dora_trains_its_magnitudes(trained):
    variant, _, _, seen = trained
    magnitudes = [n for n, p in seen["model"].named_parameters() if p.requires_grad and "lora_magnitude_vector" in n]
    assert bool(magnitudes) == (variant == "dora")


def test_the_planner_counts_doras_magnitudes_activations_and_weight_norm(write_experiment):
    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    plans = {v: budget.plan_experiment(config.load(path, [f'method.lora.variant="{v}"'])).plan for v in VARIANTS}
    lora, dora = plans["lora"], plans["dora"]
    assert plans["rslora"].total == lora.total  # rsLoRA only changes a scale
    arch = lora.arch
    n_lora, _ = cost.lora_params(arch, lora.work)
    n_dora, _ = cost.lora_params(arch, dora.work)
    assert n_dora - n_lora == arch.layers * sum(o for _, o in arch.linears().values())  # one per output feature
    assert cost.layer_activation_bytes(arch, dora.work) > cost.layer_activation_bytes(arch, lora.work)
    norm = next(c for c in dora.components if c.name == "DoRA weight norm")
    assert norm.bytes > 0 and "DoRA weight norm" not in {c.name for c in lora.components}
    assert dora.total > lora.total
    dropped = cost.plan(arch, replace(dora.work, lora_dropout=0.1, gradient_checkpointing=False))
    kept = cost.plan(arch, replace(dora.work, lora_dropout=0.0, gradient_checkpointing=False))
    # with dropout peft recomputes the base output from the dropped input, keeping each layer's dequantised weights
    weights = cost.dora_weight_bytes(arch, replace(dora.work, lora_dropout=0.1))
    assert weights > 0 and dropped.total - kept.total >= weights * arch.layers


@pytest.mark.parametrize("keys, expected", [
    ({"init": "pissa"}, "method.lora.init = 'pissa' can't work on a 4-bit base"),
    ({"init": "loftq"}, "method.lora.init = 'loftq' needs a CUDA GPU"),
    ({"init": "loftq", "variant": "dora"}, "'loftq' and variant = 'dora' don't go together"),
    ({"init": "loftq"}, "method.lora.alpha: LoftQ sets B x A"),
    ({"variant": "vera"}, "method.lora.variant"),
])
def test_combinations_that_cant_work_are_refused_before_a_run(write_experiment, tmp_path, capsys, keys, expected):
    if "CUDA" in expected and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    path = write_experiment(with_lora(TINY_EXPERIMENT, **keys), TINY_ROWS)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_loftq_is_refused_where_the_reference_is_the_base(write_experiment, capsys, method):
    rows = ([{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 8 if method == "dpo" else
            [{"prompt": "Q", "completion": "a", "label": i % 2 == 0} for i in range(8)])
    text = with_lora(TINY_EXPERIMENT.replace('name = "qlora_sft"', f'name = "{method}"'), init="loftq")
    assert main(["run", str(write_experiment(text.replace("alpha = 16", "alpha = 8"), rows))]) == 2
    assert "this method's reference is the base with the adapter off" in capsys.readouterr().err


@pytest.mark.gpu
def test_loftq_starts_nearer_the_16_bit_weights_and_reloads_with_the_same_logits(write_experiment):
    """On a GPU: LoftQ's B x A brings the 4-bit layer closer to the original weights than the base alone, and the
    trained adapter reloads in plain peft with the trained model's logits."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    path = write_experiment(with_lora(TINY_EXPERIMENT, init="loftq").replace("alpha = 16", "alpha = 8"), TINY_ROWS)
    exp = config.load(path)
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    layer = method.load(prep.source, prep.tokenizer).base_model.model.model.layers[0].self_attn.q_proj
    with safe_open(f"{prep.source.path()}/model.safetensors", framework="pt") as f:
        original = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float().cuda()
    weight = layer.base_layer.weight
    quantised = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float() * layer.scaling["default"]
    assert (original - quantised - delta).norm() < (original - quantised).norm()
    # float32 compute, so that the trained model's fused kernels and plain peft's modules round alike
    exp, folder, seen = train_probed(path, ["method.compute_dtype=float32"])
    reloaded = reloaded_in_plain_peft(exp, folder)
    assert torch.allclose(logits(reloaded, StageObserver.PROBE.cuda()), seen["logits"], atol=1e-3)
