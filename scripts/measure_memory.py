"""Measure peak GPU memory of QLoRA training on the random llama2-7b and compare it with fx's planner.

Each configuration trains for a few optimizer steps through fx's own method (``qlora_sft``: bitsandbytes NF4,
peft LoRA, trl SFTTrainer) on rows of exactly the configured length, and reads
``torch.cuda.max_memory_reserved`` / ``max_memory_allocated`` over those steps. The 4-bit base model is
loaded once per compute dtype; each configuration attaches fresh adapters and a fresh optimizer, and the
allocator's cache is emptied and its peak reset in between.

    python scripts/measure_memory.py --out memory.json            # on a GPU: measure (writes JSON)
    python scripts/measure_memory.py --render memory.json         # anywhere: write docs/memory.md from it

The random weights are written into the fx cache once (``FX_CACHE``); a GPU call that measures needs the
cut tokenizer folder there already (see docs/memory.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# (compute dtype, micro-batch, sequence length, gradient checkpointing, LoRA rank, targets, dropout)
# "calibration" fitted the planner's two measured constants; "validation" checks it on configurations it never saw.
CALIBRATION = [
    ("float16", 4, 1024, True, 64, "q_proj,v_proj", 0.1),
    ("float16", 1, 256, True, 8, "q_proj,v_proj", 0.1),
    ("float16", 8, 512, True, 16, "q_proj,v_proj", 0.1),
    ("float16", 2, 2048, True, 64, "q_proj,v_proj", 0.1),
    ("float16", 1, 4096, True, 32, "q_proj,v_proj", 0.1),
    ("float16", 8, 4096, True, 64, "q_proj,v_proj", 0.1),
    ("float16", 1, 1024, False, 64, "q_proj,v_proj", 0.1),
    ("float16", 4, 512, False, 8, "q_proj,v_proj", 0.1),
    ("float16", 2, 2048, False, 16, "q_proj,v_proj", 0.1),
    ("float16", 1, 4096, False, 64, "q_proj,v_proj", 0.0),
    ("float16", 4, 1024, True, 64, "all-linear", 0.05),
    ("bfloat16", 4, 1024, True, 64, "q_proj,v_proj", 0.1),
    ("bfloat16", 8, 256, False, 32, "q_proj,v_proj", 0.1),
    ("bfloat16", 2, 4096, True, 8, "q_proj,v_proj", 0.1),
    ("bfloat16", 4, 2048, False, 64, "q_proj,v_proj", 0.1),
]
VALIDATION = [
    ("float16", 4, 1024, True, 64, "q_proj,v_proj", 0.1),  # the reference recipe at its longest batch
    ("float16", 2, 256, True, 16, "q_proj,v_proj", 0.1),
    ("float16", 4, 768, True, 32, "q_proj,v_proj", 0.1),
    ("float16", 6, 1024, True, 64, "q_proj,v_proj", 0.1),
    ("float16", 8, 2048, True, 8, "q_proj,v_proj", 0.1),
    ("float16", 3, 4096, True, 64, "q_proj,v_proj", 0.1),
    ("float16", 2, 512, False, 32, "q_proj,v_proj", 0.1),
    ("float16", 8, 256, False, 64, "q_proj,v_proj", 0.1),
    ("float16", 1, 2048, False, 8, "q_proj,v_proj", 0.1),
    ("float16", 2, 1024, True, 16, "all-linear", 0.05),
    ("bfloat16", 1, 512, True, 64, "q_proj,v_proj", 0.1),
    ("bfloat16", 8, 1024, True, 32, "q_proj,v_proj", 0.1),
    ("bfloat16", 4, 4096, True, 16, "q_proj,v_proj", 0.1),
    ("bfloat16", 2, 1536, False, 64, "q_proj,v_proj", 0.1),
    ("bfloat16", 6, 512, False, 8, "q_proj,v_proj", 0.1),
    ("bfloat16", 1, 3072, False, 32, "q_proj,v_proj", 0.0),
]
MATRICES = {"calibration": CALIBRATION, "validation": VALIDATION}


def qlora_sft():
    from fx.hooks import manager

    return manager.get()["methods"]["qlora_sft"].cls


def settings_for(dtype, batch, gc_on, r, targets, dropout):
    target_modules = targets if targets == "all-linear" else targets.split(",")
    return qlora_sft().Settings.model_validate({
        "compute_dtype": dtype, "micro_batch_size": batch, "gradient_checkpointing": gc_on,
        "optim": "paged_adamw_32bit", "max_steps": 3, "logging_steps": 1, "warmup_ratio": 0.0,
        "lora": {"r": r, "alpha": 16, "dropout": dropout, "target_modules": target_modules},
    })


def measure(args) -> list[dict]:
    import torch
    from transformers import logging as tlog

    from fx.hooks import manager
    from fx.plan.cost import plan
    from fx.plan.shapes import Architecture
    from fx.training import contract
    from fx.training.method import Session

    tlog.set_verbosity_error()
    QLoraSFT = qlora_sft()
    random = manager.get()["models"]["random"].cls
    source = random(random.Settings(architecture="llama2-7b"))
    t0 = time.perf_counter()
    source.path()  # writes the random weights once
    print(f"weights ready in {time.perf_counter() - t0:.0f} s", flush=True)
    tokenizer = source.tokenizer()
    arch = Architecture.from_config(source.config())
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.init()
    free0, _ = torch.cuda.mem_get_info()
    results: list[dict] = [{"meta": {
        "gpu": torch.cuda.get_device_name(0), "total_gib": total / GIB, "torch": torch.__version__,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "context_gib": (total - free0) / GIB,
        "matrix": args.matrix}}]
    matrix = [m for m in MATRICES[args.matrix] if not args.only or m[0] in args.only]
    for dtype in dict.fromkeys(m[0] for m in matrix):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        base = QLoraSFT(settings_for(dtype, 1, False, 8, "q_proj,v_proj", 0.1)).load_base(source)
        load_s = time.perf_counter() - t0
        load_peak = torch.cuda.max_memory_reserved()
        free, _ = torch.cuda.mem_get_info()
        print(f"{dtype}: base loaded in {load_s:.0f} s; allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB, "
              f"reserved {torch.cuda.memory_reserved() / GIB:.3f}, load peak reserved {load_peak / GIB:.3f}, "
              f"device used {(total - free) / GIB:.3f}", flush=True)
        static = torch.cuda.memory_allocated()
        if args.probe:
            for targets, dropout in (("q_proj,v_proj", 0.1), ("all-linear", 0.05), ("q_proj,v_proj", 0.0)):
                method = QLoraSFT(settings_for(dtype, 1, False, 64, targets, dropout))
                base = probe_saved(base, method, arch, dtype, 1024)
        for m in (m for m in matrix if m[0] == dtype):
            _, batch, seq, gc_on, r, targets, dropout = m
            method = QLoraSFT(settings_for(*m[:1], batch, gc_on, r, targets, dropout))
            if gc_on:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.enable_input_require_grads()
            else:
                base.gradient_checkpointing_disable()
                if hasattr(base, "_require_grads_hook"):
                    base.disable_input_require_grads()
            gen = torch.Generator().manual_seed(seq * 31 + batch)
            rows = []
            for _ in range(batch * 3):
                ids = torch.randint(3, arch.vocab, (seq,), generator=gen).tolist()
                rows.append({"input_ids": ids, "labels": ids})
            work = method.workload(seq)
            est = plan(arch, work)
            entry = {"dtype": dtype, "batch": batch, "seq": seq, "checkpointing": gc_on, "r": r, "targets": targets,
                     "dropout": dropout, "static_allocated_gib": static / GIB,
                     "estimate_reserved_gib": est.reserved / GIB, "estimate_total_gib": est.total / GIB,
                     "estimate_components": est.as_dict()["components"]}
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                model = method.attach(base)
                trainer = contract.build(method, model, tokenizer, rows, Session(Path("/tmp/measure-out"), 0))
                t0 = time.perf_counter()
                trainer.train()
                torch.cuda.synchronize()
                entry["train_s"] = time.perf_counter() - t0
                free, _ = torch.cuda.mem_get_info()
                entry["device_used_after_gib"] = (total - free) / GIB
                entry["reserved_after_gib"] = torch.cuda.memory_reserved() / GIB
                entry["measured_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
                entry["measured_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                del trainer
                base = model.unload()
                del model
            except torch.OutOfMemoryError as exc:
                entry["error"] = f"OOM: {str(exc).splitlines()[0][:200]}"
                return results + [entry]
            entry["error_pct"] = 100 * (entry["estimate_reserved_gib"] / entry["measured_reserved_gib"] - 1)
            results.append(entry)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
            print(f"{dtype:8s} b{batch} s{seq:<5d} gc={int(gc_on)} r{r:<3d} {targets:14s} p={dropout}: measured "
                  f"reserved {entry['measured_reserved_gib']:.3f} allocated {entry['measured_allocated_gib']:.3f} | "
                  f"estimate {entry['estimate_reserved_gib']:.3f} ({entry['error_pct']:+.1f}%) | "
                  f"{entry['train_s']:.1f} s | device {entry['device_used_after_gib']:.2f}", flush=True)
        del base
    return results


def probe_saved(base, method, arch, dtype: str, seq: int):
    """Print the bytes autograd saves per token and decoder layer next to the planner's figure for them."""
    import torch

    from fx.plan.cost import layer_activation_bytes

    base.gradient_checkpointing_disable()
    model = method.attach(base)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.device.type == "cuda" and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(3, arch.vocab, (1, seq), device="cuda")
    backbone = model.get_base_model().model
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cuda", dtype=getattr(torch, dtype))):
        hidden = backbone(input_ids=ids).last_hidden_state
    per_layer = sum(seen.values()) / arch.layers / seq
    formula = layer_activation_bytes(arch, method.workload(seq))
    print(f"probe {dtype} {method.settings.lora.target_modules} p={method.settings.lora.dropout}: saved "
          f"{per_layer:.0f} B/token/layer; planner {formula:.0f} ({100 * (formula / per_layer - 1):+.1f}%)", flush=True)
    del hidden
    return model.unload()


def render(results: list[dict], out: Path, name: str) -> None:
    meta = results[0]["meta"]
    rows = [r for r in results[1:] if "measured_reserved_gib" in r]
    lines = [
        "| dtype | micro-batch | seq | checkpointing | r | targets | dropout | estimate (GiB) | measured reserved | "
        "measured allocated | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for r in rows:
        err = r["error_pct"]
        worst = max(worst, abs(err))
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['seq']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['r']} | {r['targets']} | {r['dropout']} | {r['estimate_reserved_gib']:.2f} | "
                     f"{r['measured_reserved_gib']:.2f} | {r['measured_allocated_gib']:.2f} | {err:+.1f}% |")
    table = "\n".join(lines)
    text = out.read_text() if out.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = (f"{start}\nMeasured on {meta['gpu']} (torch {meta['torch']}, `PYTORCH_CUDA_ALLOC_CONF="
             f"{meta['alloc_conf']}`), {len(rows)} configurations; largest error {worst:.1f}%.\n\n{table}\n{end}")
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(table)
    print(f"largest error {worst:.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the measurements as JSON here")
    p.add_argument("--render", type=Path, help="a measurements JSON to re-estimate and render into --doc")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "memory.md")
    p.add_argument("--probe", action="store_true", help="also count the bytes autograd saves per layer")
    p.add_argument("--matrix", choices=sorted(MATRICES), default="validation")
    p.add_argument("--only", nargs="*", help="compute dtypes to measure (default: all)")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        render(reestimate(results), args.doc, results[0]["meta"].get("matrix", args.matrix))
        return 0
    results = measure(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def reestimate(results: list[dict]) -> list[dict]:
    """Recompute each row's estimate with the planner as it is now (the measurements stay as measured)."""
    from fx.plan.cost import plan
    from fx.plan.shapes import Architecture
    from fx.sources.architectures import llama_config

    QLoraSFT = qlora_sft()
    arch = Architecture.from_config(llama_config("llama2-7b"))
    for r in results[1:]:
        if "measured_reserved_gib" not in r:
            continue
        method = QLoraSFT(settings_for(r["dtype"], r["batch"], r["checkpointing"], r["r"], r["targets"], r["dropout"]))
        est = plan(arch, method.workload(r["seq"]))
        r["estimate_reserved_gib"] = est.reserved / GIB
        r["error_pct"] = 100 * (r["estimate_reserved_gib"] / r["measured_reserved_gib"] - 1)
    return results


if __name__ == "__main__":
    sys.exit(main())
