"""The workers of scripts/measure_kernels.py, one process each: ``plain`` (the plain recipe, fx.bench.reference, on
both recipes: one model, its adapter unloaded between them), ``fx`` (the 4-bit base loaded once, every variant a
fresh adapter on it, configured as that variant's experiment says) and ``unsloth`` (one recipe: Unsloth patches
transformers when it is imported, so it runs alone, imported first). Each writes DIR/results/<kind>-<recipe>-<n>.json
as soon as a variant is measured; a failing variant is written with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from measure_kernels import (
    RECIPES,
    barrier,
    callbacks,
    count_tokens,
    gpu_turn,
    measured,
    recipe_sets,
    wait_for,
    write_json,
)

# fx's variants, on top of each recipe: the previous defaults, each lever alone on them, all of them, and the T4 path
PREVIOUS = ["method.gradient_checkpointing=true", "method.dequantize_once=false", "method.fused_lora=false"]
ALL = ["method.gradient_checkpointing=true", "method.dequantize_once=true", "method.fused_lora=true",
       "method.optim=adamw_torch_fused"]
FX_VARIANTS = {  # short name -> (label, --set assignments)
    "levers": ("fx, all levers (checkpointing every layer)", ALL),
    "previous": ("fx, previous defaults", PREVIOUS),
    "auto": ("fx, all levers + gradient_checkpointing=auto", [*ALL, "method.gradient_checkpointing=auto"]),
    "sdpa": ("fx, T4 path (sdpa), all levers", [*ALL, "method.attention=sdpa"]),
    "sdpa-auto": ("fx, T4 path (sdpa), all levers + auto",
                  [*ALL, "method.attention=sdpa", "method.gradient_checkpointing=auto"]),
    "eff-auto": ("fx, T4 path (varlen, memory-efficient kernel), all levers + auto",
                 [*ALL, "method.attention=varlen_efficient", "method.gradient_checkpointing=auto"]),
    "previous+dequant": ("fx, previous + dequantize_once", [*PREVIOUS, "method.dequantize_once=true"]),
    "previous+fused": ("fx, previous + fused_lora", [*PREVIOUS, "method.fused_lora=true"]),
    "previous+adamw": ("fx, previous + adamw_torch_fused", [*PREVIOUS, "method.optim=adamw_torch_fused"]),
    "sdpa-previous": ("fx, T4 path (sdpa), previous defaults", [*PREVIOUS, "method.attention=sdpa"]),
}


def result_path(args, kind: str, recipe: str, order: int) -> Path:
    return args.out / "results" / f"{kind}-{recipe}-{order:02d}.json"


def record(args, kind: str, recipe: str, order: int, variant: str, measure) -> None:
    """Measure one variant in the GPU's turn and write its result, or its error."""
    import torch

    started = time.perf_counter()
    entry = {"kind": kind, "recipe": recipe, "order": order, "variant": variant}
    try:
        with gpu_turn(args.out):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            entry.update(measure())
    except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        entry["traceback"] = traceback.format_exc()[-3000:]
        print(entry["traceback"], flush=True)
    entry["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(result_path(args, kind, recipe, order), entry)
    print(f"{kind} {recipe} {variant}: {entry.get('kernel_us_per_token')} us/token, "
          f"{entry.get('tokens_per_s')} tokens/s, {entry.get('error', '')} ({entry['wall_s']} s)", flush=True)


def train(trainer, args) -> dict:
    """Train with the timer and profiler; their numbers."""
    counter = [0]
    timer, profiler = callbacks(args.warmup, args.steps, args.profile, counter)
    trainer.add_callback(timer)
    trainer.add_callback(profiler)
    count_tokens(trainer, counter)
    trainer.train()
    return measured(timer, profiler, args.warmup, args.steps, args.profile)


def max_steps(args) -> int:
    return args.warmup + args.steps + args.profile


def resolve_steps(args) -> None:
    """``--steps epoch``: the steps of one whole epoch of the experiment (written by the setup), so the timed
    window is every step of it and the profiled steps are the first of the next epoch."""
    if args.steps == "epoch":
        args.steps = json.loads((args.out / "work" / "setup.json").read_text())["epoch_steps"]
    args.steps = int(args.steps)


# -- plain ----------------------------------------------------------------------------------------------------------

def plain(args) -> None:
    import torch

    from fx import config
    from fx.bench import reference
    from fx.data.prepare import prepare

    setup = json.loads((args.out / "work" / "setup.json").read_text())
    if setup["cap_fraction"]:
        torch.cuda.set_per_process_memory_fraction(setup["cap_fraction"], 0)
    exp = config.load(args.experiment)
    prep = prepare(exp)
    model, tokenizer = reference.load(prep)
    barrier(args.out, "plain")
    for order, recipe in enumerate(args.recipes):
        def measure(recipe=recipe):
            nonlocal model
            with tempfile.TemporaryDirectory() as tmp:
                lora = {k: RECIPES[recipe][k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
                trainer = reference.build(prep, exp, model, tokenizer, Path(tmp), max_steps(args), lora=lora)
                try:
                    return train(trainer, args)
                finally:
                    model = trainer.model.unload()  # the base again, for the next recipe
                    del trainer
        record(args, "plain", recipe, order, "plain recipe (fx.bench.reference)", measure)


# -- fx -------------------------------------------------------------------------------------------------------------

def fx(args) -> None:
    import torch

    from fx import config
    from fx.data.prepare import prepare
    from fx.training import budget, contract
    from fx.training.checkpointing import decoder_layers, enable_checkpointing, layer_count
    from fx.training.kernels import choose_attention
    from fx.training.lora4bit import functions, mlp_function, remove
    from fx.training.method import Session

    exp = config.load(args.experiment, ALL)
    prep = prepare(exp)
    method = exp.method.cls(exp.method.settings)
    base = method.load_base(prep.source)
    calls = {"KeptDequantized": 0, "FusedLora4bit": 0, "SwiGLUDownLora4bit": 0}
    for fn in (*functions(), mlp_function()):  # how often fx's 4-bit paths ran (eager and captured steps; replays none)
        original = fn.apply

        def counted(*a, _original=original, _name=fn.__name__):
            calls[_name] += 1
            return _original(*a)

        fn.apply = counted
    if torch.cuda.is_available():
        write_json(args.out / "work" / "optimizer-check.json", optimizer_check())
    barrier(args.out, "fx")
    order = 0
    for recipe in args.recipes:
        for key in args.fx_variants:
            # NAME@N: this variant times N steps instead of --steps (a shorter run where a whole epoch won't fit)
            name, _, steps = key.partition("@")
            variant, sets = FX_VARIANTS[name]
            run = argparse.Namespace(**{**vars(args), "steps": int(steps) if steps else args.steps})

            def measure(sets=sets, recipe=recipe, args=run):
                fitted = budget.fit(config.load(args.experiment, [*recipe_sets(recipe), *sets]))
                s = fitted.exp.method.settings
                cap = budget.cap_allocator(fitted)
                base.set_attn_implementation("sdpa")  # back from an earlier variant's varlen
                attention = choose_attention(base, s.attention, s.padding_free)
                type(base).gradient_checkpointing_disable(base)
                base.__dict__.pop("gradient_checkpointing_enable", None)
                layers = layer_count(s.gradient_checkpointing, len(decoder_layers(base)))
                enable_checkpointing(base, layers)
                variant_method = fitted.exp.method.cls(s)
                model = variant_method.prepare_training(variant_method.attach(base))
                for key in calls:
                    calls[key] = 0
                with tempfile.TemporaryDirectory() as tmp:
                    session = Session(output_dir=Path(tmp), seed=fitted.exp.experiment.seed, max_steps=max_steps(args))
                    trainer = contract.build(variant_method, model, prep.tokenizer, prep.train.rows, session)
                    try:
                        out = train(trainer, args)
                    finally:
                        graphs = getattr(trainer, "graph_stats", None)
                        del trainer
                        remove(model)
                        model.unload()
                        if torch.cuda.is_available():
                            torch.cuda.set_per_process_memory_fraction(1.0, 0)
                plan = fitted.summary()
                return {**out, "sets": sets, "attention": attention, "checkpointed_layers": layers,
                        "cap_gib": cap / 2**30 if cap else None, "plan_reserved_gib": plan["reserved_gib"],
                        "plan_total_gib": plan["total_gib"], "auto_changes": fitted.changes,
                        "fx_4bit_calls": dict(calls), "cuda_graphs": graphs, "optim": s.optim}
            record(args, "fx", recipe, order, variant if run.steps == args.steps else f"{variant} ({run.steps} steps)",
                   measure)
            order += 1


def optimizer_check() -> dict:
    """torch's fused AdamW against bitsandbytes' paged 32-bit AdamW (the recipe's) on the same gradients: the same
    update rule, so the weights after 20 steps differ only by rounding."""
    import bitsandbytes as bnb
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    start = [torch.randn(n, device="cuda", generator=gen) * 0.02 for n in (262144, 524288, 4096)]
    grads = [[torch.randn(p.shape, device="cuda", generator=gen) * 1e-3 for p in start] for _ in range(20)]
    finals = {}
    hyper = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.001)
    for name, make in (("paged_adamw_32bit", lambda ps: bnb.optim.PagedAdamW32bit(ps, **hyper)),
                       ("adamw_torch_fused", lambda ps: torch.optim.AdamW(ps, fused=True, **hyper))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        torch.cuda.synchronize()
        finals[name] = [p.detach() for p in params]
    moved = max(float((b - a).abs().max()) for a, b in zip(start, finals["adamw_torch_fused"]))
    diff = max(float((a - b).abs().max()) for a, b in zip(*finals.values()))
    return {"steps": 20, "largest_update": moved, "largest_difference": diff, "relative": diff / moved}


# -- Unsloth --------------------------------------------------------------------------------------------------------

def unsloth_worker(args) -> None:
    """Unsloth's own recommended settings (its Llama notebooks): FastLanguageModel in 4 bits, its gradient
    checkpointing ("unsloth"), 8-bit AdamW; fp16, as on a T4; the recipe's LoRA, batch and schedule."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.append(str(args.devsite / "site-fallback"))  # after the machine's own packages
    started = time.perf_counter()
    import unsloth  # noqa: F401 - first, before transformers, as Unsloth asks
    from unsloth import FastLanguageModel

    import_s = time.perf_counter() - started
    import torch
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    name = f"unsloth-{args.recipe}"
    if not wait_for(args.out / "work" / "setup.json", 600):
        raise SystemExit("no setup.json")
    setup = json.loads((args.out / "work" / "setup.json").read_text())
    resolve_steps(args)
    if setup["cap_fraction"]:
        torch.cuda.set_per_process_memory_fraction(setup["cap_fraction"], 0)
    r = RECIPES[args.recipe]
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(model_name=setup["model"],
                                                             max_seq_length=setup["max_length"],
                                                             dtype=torch.float16, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=r["r"], target_modules=r["target_modules"],
                                                 lora_alpha=r["lora_alpha"], lora_dropout=r["lora_dropout"],
                                                 bias="none", use_gradient_checkpointing="unsloth",
                                                 random_state=setup["seed"])
    finally:
        barrier(args.out, name)

    def measure():
        with tempfile.TemporaryDirectory() as tmp:
            config = SFTConfig(
                output_dir=tmp, max_steps=max_steps(args), per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=2e-4, weight_decay=0.001, max_grad_norm=0.3,
                warmup_steps=0.03, lr_scheduler_type="cosine", optim="adamw_8bit", fp16=True, bf16=False,
                logging_steps=setup["logging_steps"], save_strategy="no", report_to="none", seed=setup["seed"],
                train_sampling_strategy="group_by_length", dataset_text_field="text",
                max_length=setup["max_length"], packing=False, disable_tqdm=True,
                include_num_input_tokens_seen="non_padding")
            trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config,
                                 train_dataset=Dataset.from_dict({"text": setup["texts"]}))
            out = train(trainer, args)
        import unsloth as u

        return {**out, "unsloth": getattr(u, "__version__", None), "import_s": import_s}

    record(args, "unsloth", args.recipe, 0, f"Unsloth (r={r['r']}, its recommended settings)", measure)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["plain", "fx", "unsloth"])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", default="6", help="a number, or 'epoch'")
    parser.add_argument("--profile", type=int, default=4)
    parser.add_argument("--recipes", type=lambda s: s.split(","), default=list(RECIPES))
    parser.add_argument("--recipe", default="qv")
    parser.add_argument("--fx-variants", type=lambda s: s.split(","), default=list(FX_VARIANTS))
    parser.add_argument("--devsite", type=Path, default=Path("/tmp/dev"))
    args = parser.parse_args()
    name = args.kind if args.kind != "unsloth" else f"unsloth-{args.recipe}"
    if args.kind != "unsloth" and not wait_for(args.out / "work" / "setup.json", 600):
        (args.out / "work" / "ready").mkdir(parents=True, exist_ok=True)
        (args.out / "work" / "ready" / name).touch()
        raise SystemExit("no setup.json: the setup failed")
    try:
        if args.kind != "unsloth":
            resolve_steps(args)
        {"plain": plain, "fx": fx, "unsloth": unsloth_worker}[args.kind](args)
    except BaseException:
        (args.out / "work" / "ready").mkdir(parents=True, exist_ok=True)
        (args.out / "work" / "ready" / name).touch()  # the others mustn't wait for a worker that died
        write_json(args.out / "results" / f"{name}-failed.json",
                   {"kind": args.kind, "recipe": args.recipe if args.kind == "unsloth" else "all-recipes",
                    "variant": f"{name} worker", "error": traceback.format_exc()[-1500:]})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
