"""GPU work per real token, side by side on one GPU under the experiment's budget: the plain recipe
(fx.bench.reference), Unsloth with its own recommended settings, and fx (each lever of docs/performance.md on and
off), for two LoRA recipes: ``qv`` (r=64 on q_proj/v_proj, dropout 0.1: the tutorial) and ``all`` (r=16 on all 7
linears, dropout 0).

    python scripts/measure_kernels.py experiments/llama2_qlora_bench.toml --out DIR [--deadline 510]

Every variant trains ``--warmup`` steps, then ``--steps`` timed steps (tokens/s), then ``--profile`` steps under
torch.profiler (the kernels' own device time, divided by the real tokens of those steps). Real tokens are counted
from each micro-batch (its attention mask, or a padding-free batch's length), the same way for all three.

Workers run as separate processes (scripts/kernel_workers.py): one for the plain recipe, one for fx (the 4-bit base
loaded once, each variant a fresh adapter on it), one per recipe for Unsloth (it patches transformers when imported).
They load at the same time, wait until all have loaded, then take turns on the GPU (a lock file): one variant
measures at a time. Each variant's result is written as soon as it is measured (DIR/results/*.json, with its top
kernels); the table at the end (DIR/summary.json, DIR/table.md) is made from whatever is there, also after a worker
failed or ``--deadline`` ran out. ``--devsite DIR``: the unpacked site-packages folders of the GPU machine's extra
packages (site/, site-unsloth/, site-fallback/), for the Unsloth workers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {
    "qv": {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "all": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
# kernel name fragments (lower case) -> category; the first that matches wins
CATEGORIES = [
    ("4-bit gemm", ("gemm_4bit", "kgemm_4bit")),
    ("dequantise", ("dequantize", "kdequant")),
    ("optimizer", ("optimizer", "adam", "multi_tensor_apply", "foreach")),
    ("attention", ("flash", "fmha", "attention", "cudnn", "varlen", "attn")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "cublas", "nvjet", "sm90_", "sm80_", "ampere", "matmul", "splitk")),
    ("fused (Triton)", ("rms", "rope", "swiglu", "silu", "norm", "cross_entropy", "logprob", "_fg_kernel", "_kernel")),
]


def recipe_sets(recipe: str) -> list[str]:
    """fx's --set assignments for a recipe."""
    r = RECIPES[recipe]
    targets = "[" + ", ".join(f'"{t}"' for t in r["target_modules"]) + "]"
    return [f"method.lora.r={r['r']}", f"method.lora.alpha={r['lora_alpha']}",
            f"method.lora.dropout={r['lora_dropout']}", f"method.lora.target_modules={targets}"]


# -- shared by the workers ------------------------------------------------------------------------------------------

def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def barrier(out: Path, name: str, timeout: float = 300) -> None:
    """Say this worker has loaded, then wait (at most ``timeout`` s) until every worker has: no load while a
    variant is measured."""
    ready = out / "work" / "ready"
    ready.mkdir(parents=True, exist_ok=True)
    (ready / name).touch()
    expected = set(json.loads((out / "work" / "workers.json").read_text()))
    deadline = time.monotonic() + timeout
    while not expected <= {p.name for p in ready.iterdir()} and time.monotonic() < deadline:
        time.sleep(1)


@contextlib.contextmanager
def gpu_turn(out: Path):
    """One variant at a time on the GPU."""
    with open(out / "work" / "gpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def count_tokens(trainer, counter: list[int]) -> None:
    """Count each micro-batch's real tokens into ``counter[0]`` (its attention mask's ones, or all the tokens of a
    padding-free batch), whatever the trainer counts itself."""
    step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        counter[0] += int(mask.sum()) if mask is not None and mask.dim() == 2 else int(inputs["input_ids"].numel())
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def callbacks(warmup: int, steps: int, profiled: int, counter: list[int]):
    """(timer, profiler): trainer callbacks timing every step (GPU synchronised) with its real tokens, and
    profiling the ``profiled`` steps after ``warmup + steps``."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.seen = [], [], []  # seen: the trainer's own count, for a fallback

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = (time.perf_counter(), counter[0], state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start[0])
            self.tokens.append(counter[0] - self.start[1])
            self.seen.append(int(state.num_input_tokens_seen - self.start[2]))

    class Profiler(TrainerCallback):
        def __init__(self):
            self.profiler, self.kernels, self.wall = None, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps and self.profiler is None:
                sync()
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or self.kernels is not None or state.global_step != warmup + steps + profiled:
                return
            sync()
            self.wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            # kernels only (an operator's own device time would count its kernels twice); on a CPU, no kernels
            self.kernels = {e.key: (e.self_device_time_total, e.count) for e in self.profiler.key_averages()
                            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}

    return Timer(), Profiler()


def categorise(kernels: dict[str, tuple[float, int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        low = name.lower()
        category = next((c for c, parts in CATEGORIES if any(p in low for p in parts)), "other")
        out[category] = out.get(category, 0.0) + us
    return out


def measured(timer, profiler, warmup: int, steps: int, profiled: int) -> dict:
    """A variant's numbers from its callbacks and the allocator."""
    import torch

    counted = timer.tokens if any(timer.tokens) else timer.seen  # a trainer that bypasses training_step
    times, tokens = timer.times[warmup:warmup + steps], counted[warmup:warmup + steps]
    prof_tokens = sum(counted[warmup + steps:warmup + steps + profiled])
    kernels = profiler.kernels or {}
    kernel_us = sum(us for us, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "timed_steps": len(times), "timed_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / sum(times) if times else None,
        "step_s": [round(t, 4) for t in timer.times], "step_tokens": counted, "trainer_counted_tokens": timer.seen,
        "tokens_counted_by": "micro-batches" if counted is timer.tokens else "the trainer",
        "profiled_steps": profiled if profiler.kernels is not None else 0, "profiled_tokens": prof_tokens,
        "profiled_wall_s": profiler.wall, "kernel_s": kernel_us / 1e6,
        "kernel_us_per_token": kernel_us / prof_tokens if prof_tokens and kernels else None,
        "categories_us_per_token": {c: us / prof_tokens for c, us in categorise(kernels).items()} if prof_tokens
        else {},
        "top_kernels": [{"name": k[:160], "us": round(us, 1), "calls": n} for k, (us, n) in top],
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


# -- the orchestrator -----------------------------------------------------------------------------------------------

def setup(args) -> None:
    """Write the random weights (once per machine), and what every worker shares: the model folder, the plain
    texts, the allocator cap of the plain recipe's plan."""
    import torch

    from fx import config
    from fx.data.prepare import prepare
    from fx.data.tokenize import render
    from fx.plan.fit import allocator_fraction
    from fx.training import budget

    exp = config.load(args.experiment)
    s = exp.method.settings
    fitted = budget.fit(exp)
    prep = prepare(fitted.exp)  # writes the weights the first time
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    fraction = allocator_fraction(fitted.plan, fitted.budget_bytes, total) if total and fitted.budget_bytes else None
    write_json(args.out / "work" / "setup.json", {
        "model": prep.source.path(), "max_length": exp.data.max_length, "seed": exp.experiment.seed,
        "texts": [render(prep.template, e).text for e in prep.train_examples], "cap_fraction": fraction,
        "budget": fitted.budget_label, "logging_steps": exp.method.settings.logging_steps,
        "epoch_steps": -(-len(prep.train_examples) // (s.micro_batch_size * s.gradient_accumulation_steps))})


def workers(args) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, environment): Unsloth's workers see its packages (and the trl and datasets releases it
    supports) first, each with a compile cache of its own."""
    script = str(HERE / "kernel_workers.py")
    common = [str(args.experiment), "--out", str(args.out), "--warmup", str(args.warmup), "--steps", str(args.steps),
              "--profile", str(args.profile), "--recipes", ",".join(args.recipes)]
    fx_only = ["--fx-variants", ",".join(args.fx_variants)] if args.fx_variants else []
    env = dict(os.environ)
    out = {}
    if "plain" in args.only:
        plain = common if args.plain_steps is None else [*common, "--steps", str(args.plain_steps)]
        out["plain"] = ([sys.executable, script, "plain", *plain], env)
    if "fx" in args.only:
        out["fx"] = ([sys.executable, script, "fx", *common, *fx_only], env)
    if "unsloth" in args.only:
        for recipe in args.recipes:
            path = os.pathsep.join([str(args.devsite / "site-unsloth"), env.get("PYTHONPATH", "")])
            out[f"unsloth-{recipe}"] = (
                [sys.executable, script, "unsloth", *common, "--recipe", recipe, "--devsite", str(args.devsite)],
                {**env, "PYTHONPATH": path, "UNSLOTH_COMPILE_LOCATION": f"/tmp/unsloth_compiled_cache_{recipe}"})
    return out


def table(out: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    lines = ["| recipe | variant | GPU kernel us/token | x Unsloth | tokens/s | timed steps | x plain | "
             "peak reserved GiB | plan GiB | dequant / matmul / optimizer / attention us/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        group = [r for r in rows if r.get("recipe") == recipe]
        base = {r["kind"]: r for r in group if r["kind"] in ("plain", "unsloth") and r.get("kernel_us_per_token")}
        for r in sorted(group, key=lambda r: (("plain", "unsloth", "fx").index(r["kind"]), r.get("order", 0))):
            if r.get("error"):
                lines.append(f"| {recipe} | {r['variant']} | failed: {r['error'][:120]} | | | | | | | |")
                continue
            k, tps = r.get("kernel_us_per_token"), r.get("tokens_per_s")
            un, pl = base.get("unsloth"), base.get("plain")
            c = r.get("categories_us_per_token", {})
            parts = " / ".join(f"{c.get(n, 0):.1f}" for n in ("dequantise", "matmul", "optimizer", "attention"))
            lines.append(
                f"| {recipe} | {r['variant']} | {k:.1f} | {k / un['kernel_us_per_token']:.2f}x | "
                if k and un else f"| {recipe} | {r['variant']} | {k or 0:.1f} | - | ")
            lines[-1] += (f"{tps or 0:.0f} | {r.get('timed_steps')} | "
                          + (f"{tps / pl['tokens_per_s']:.2f}x | " if tps and pl else "- | ")
                          + f"{r.get('peak_reserved_gib') or 0:.2f} | {r.get('plan_reserved_gib') or '-'} | {parts} |")
    for r in rows:
        if r.get("recipe") not in RECIPES:  # a worker that failed before its first variant
            lines.append(f"| - | {r['variant']} | failed: {str(r.get('error'))[-160:]!r} | | | | | | | |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    write_json(out / "summary.json", rows)
    print("\n".join(lines), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", default="6",
                        help="timed steps (tokens/s), or 'epoch': every step of one whole epoch (use --warmup 0)")
    parser.add_argument("--plain-steps", default=None, help="the plain recipe's timed steps, if not --steps")
    parser.add_argument("--profile", type=int, default=4, help="profiled steps (kernel time)")
    parser.add_argument("--recipes", type=lambda s: s.split(","), default=list(RECIPES))
    parser.add_argument("--only", type=lambda s: s.split(","), default=["plain", "fx", "unsloth"])
    parser.add_argument("--fx-variants", type=lambda s: s.split(","), default=None,
                        help="fx's variants by short name (scripts/kernel_workers.py FX_VARIANTS); default: all")
    parser.add_argument("--devsite", type=Path, default=Path(os.environ.get("FX_DEVSITE", "/tmp/dev")))
    parser.add_argument("--deadline", type=float, default=510, help="seconds; then stop the workers and report")
    args = parser.parse_args()
    started = time.monotonic()
    (args.out / "work").mkdir(parents=True, exist_ok=True)
    commands = workers(args)
    write_json(args.out / "work" / "workers.json", list(commands))
    procs = {}
    for name, (cmd, env) in commands.items():  # they import and wait for the setup meanwhile
        log = open(args.out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = args.deadline
    try:
        setup(args)
        print(f"setup done at {time.monotonic() - started:.0f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - the workers can't start: say why, stop them
        print(f"setup failed: {type(exc).__name__}: {exc}", flush=True)
        deadline = 0
    while any(p.poll() is None for p in procs.values()) and time.monotonic() - started < deadline:
        time.sleep(2)
    for name, proc in procs.items():
        if proc.poll() is None:
            print(f"{name}: past the deadline, stopped", flush=True)
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        print(f"{name}: exit {proc.returncode}; last lines of {name}.log:", flush=True)
        print("\n".join((args.out / f"{name}.log").read_text(errors="replace").splitlines()[-6:]), flush=True)
    print(f"\nall done at {time.monotonic() - started:.0f} s\n", flush=True)
    rows = table(args.out)
    return 0 if rows and not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
