"""The bytes autograd keeps for backward in one decoder layer of a Llama 2 7B shape (hidden 4096, intermediate 11008),
4-bit NF4 base with LoRA on all 7 linears, fx's levers on and the fused MLP off and on, next to the planner's figure
for each (fx.plan.cost.layer_activation_bytes). Runs anywhere (a CPU: float32, transformers' own layers, SDPA);
one random layer and a small vocabulary, so it needs about 3 GiB of memory and a minute.

    python scripts/measure_saved.py [--tokens 256] [--out saved.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def saved_bytes(model, layer, ids) -> int:
    """Bytes of the distinct storages autograd saves while ``layer`` runs its forward (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = [False]

    def pack(t):
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from fx.plan.cost import layer_activation_bytes
    from fx.plan.shapes import Architecture, Workload
    from fx.sources.architectures import llama_config
    from fx.training import lora4bit

    torch.manual_seed(0)
    config = llama_config("llama2-7b")
    config.num_hidden_layers, config.vocab_size = 1, 512
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"}, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    model.train()
    layer = model.get_base_model().model.layers[0]
    ids = torch.randint(3, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    arch = Architecture.from_config(config)
    work = Workload(micro_batch=1, seq_len=args.tokens, gradient_checkpointing=False, lora_r=16,
                    lora_targets=("all-linear",), lora_dropout=0.0, compute_dtype="float32")
    results = {"tokens": args.tokens, "torch": torch.__version__}
    for fused in (False, True):
        counts = lora4bit.apply_levers(model, True, True)
        if not fused:  # the fused linears without the fused MLP: what fused_lora did before it
            for module in model.modules():
                if module.__dict__.get("forward") is not None and lora4bit.fusable_mlp(module):
                    lora4bit.restore(module)
                    module.__dict__.pop(lora4bit.MARK, None)
            counts["fused_mlp"] = 0
        measured = saved_bytes(model, layer, ids) / args.tokens
        planned = layer_activation_bytes(arch, Workload(**{**work.__dict__, "fused_mlp": fused}))
        lora4bit.remove(model)
        key = "fused_mlp" if fused else "stock_mlp"
        results[key] = {"modules": counts, "measured_bytes_per_token": measured, "planned_bytes_per_token": planned}
        print(f"{key}: saved {measured:.0f} B/token in the layer; planner {planned:.0f} "
              f"({100 * (planned / measured - 1):+.1f}%)", flush=True)
    saving = results["stock_mlp"]["measured_bytes_per_token"] - results["fused_mlp"]["measured_bytes_per_token"]
    planned = results["stock_mlp"]["planned_bytes_per_token"] - results["fused_mlp"]["planned_bytes_per_token"]
    results["saving"] = {"measured": saving, "planned": planned}
    print(f"the fused MLP keeps {saving:.0f} B/token less (planner: {planned:.0f})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
