"""``fx bench``: the experiment's own training loop, timed, with its memory measured; and comparison with a baseline.

Tokens are real tokens (padding excluded, as the trainer counts them with ``non_padding``). Step times are taken
between the trainer's step callbacks with the GPU synchronised, after ``warmup`` steps that are not measured.
``tokens_per_s`` is the median of the steps' own rates, which a one-off stall (Triton compiling a kernel for a
shape it has not seen, measured at 2-3 s on an H100) cannot move; ``tokens_per_s_overall`` divides all tokens
by all time.
Model FLOPs utilisation counts the work the model must do per real token, not recomputation: 2 FLOPs per frozen
weight for the forward, 2 more for the input gradient, 6 per LoRA weight, and causal attention's
2 x 2 x layers x hidden x (row length / 2) forward, three times over for forward and backward. A preference
method (DPO) adds its no-grad reference forward: 2 FLOPs per frozen weight and attention's forward once more.

A result records the hardware, library versions, the resolved experiment and two hashes: ``full_config_hash``
of everything, and ``config_hash`` of the workload (model, data, template, method and its effective batch),
leaving out how it is executed (micro-batch split, gradient checkpointing, budget, trackers). ``--compare``
refuses results of different hardware or different workloads; it is meant to catch a regression in how the
same workload runs, which is exactly what a smaller micro-batch or checkpointing switched off would be.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fx.errors import TrainingFailed, UserError

# resolved-config keys that change how a workload runs, not what it computes
EXECUTION_KEYS = {
    "experiment": ("output_dir", "description"),
    "method": ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "logging_steps", "optim"),
}
IGNORED_SECTIONS = ("trackers", "stages", "budget")

# metric -> (label, higher is better)
GATED = {
    "tokens_per_s": ("tokens/s", True),
    "peak_reserved_gib": ("peak GPU reserved (GiB)", False),
    "peak_allocated_gib": ("peak GPU allocated (GiB)", False),
}
SHOWN = {
    "tokens_per_s_overall": ("tokens/s, all steps", True),
    "step_s_median": ("step time median (s)", False),
    "step_s_spread": ("step time p90-p10 (s)", False),
    "peak_rss_gib": ("peak CPU RSS (GiB)", False),
    "mfu": ("model FLOPs utilisation", True),
}


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def workload_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved experiment without the keys that only change how it executes; the effective batch stays."""
    out = copy.deepcopy(resolved)
    for section in IGNORED_SECTIONS:
        out.pop(section, None)
    method = out.get("method", {})
    if "micro_batch_size" in method:
        method["effective_batch"] = method["micro_batch_size"] * method.get("gradient_accumulation_steps", 1)
    for section, keys in EXECUTION_KEYS.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    for key in method_execution_keys(method.get("name")):
        method.pop(key, None)
    return out


def method_execution_keys(name: str | None) -> tuple[str, ...]:
    from fx import manager

    methods = manager.get().registries["methods"]
    return methods[name].cls.execution_keys if name in methods else ()


def hardware_key(hardware: dict[str, Any]) -> str:
    if hardware.get("cuda"):
        return f"{hardware.get('gpu')} ({hardware.get('gpu_memory_gib')} GiB)"
    return f"cpu: {hardware.get('platform')}, {hardware.get('cpu_count')} cores"


def step_timer(sync):
    """A trainer callback timing each optimizer step and counting the real tokens it trained on."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[list[float]] = []  # [step, loss] as the trainer logs them

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._start = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._start[0])
            self.tokens.append(int(state.num_input_tokens_seen - self._start[1]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append([state.global_step, float(logs["loss"])])

    return StepTimer()


def flops_per_token(arch, n_lora: int, mean_row: float, reference_forward: bool = False) -> float:
    """Model FLOPs per real token of one training step (see the module's docstring); a preference method's no-grad
    reference forward (adapter off) adds a forward of the frozen weights and of attention."""
    frozen = arch.layers * sum(i * o for i, o in arch.linears().values()) + arch.vocab * arch.hidden  # with lm_head
    attention = 2 * 2 * arch.layers * arch.hidden * (mean_row / 2)
    reference = 2 * frozen + attention if reference_forward else 0.0
    return 4 * frozen + 6 * n_lora + 3 * attention + reference


def trained_lengths(row: dict[str, list[int]]) -> list[int]:
    """The sequences one row trains as: its ids, or a preference pair's prompt with each of its two answers."""
    if "input_ids" in row:
        return [len(row["input_ids"])]
    return [len(row["prompt_ids"]) + len(row[f"{side}_ids"]) for side in ("chosen", "rejected")]


def summarise(timer, warmup: int, end: int | None = None) -> dict[str, Any]:
    times, tokens = timer.times[warmup:end], timer.tokens[warmup:end]
    if not times:
        raise UserError(f"no measured steps: the run stopped after {len(timer.times)} step(s), at or before the warm-up")
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {
        "measured_steps": len(times),
        "tokens": sum(tokens),
        # the median of the steps' own rates: a one-off stall (a kernel compiled on first use) can't move it
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
        "tokens_per_s_overall": sum(tokens) / sum(times),
        "tokens_per_step_mean": statistics.mean(tokens),
        "step_s_median": statistics.median(times),
        "step_s_p10": pct(0.1),
        "step_s_p90": pct(0.9),
        "step_s_spread": pct(0.9) - pct(0.1),
        "step_s_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_times_s": [round(t, 5) for t in times],
        "step_tokens": tokens,
        "losses": timer.losses,
    }


def memory_readings(torch) -> dict[str, Any]:
    from fx.run import peak_rss_gib

    out: dict[str, Any] = {"peak_rss_gib": peak_rss_gib()}
    if torch.cuda.is_available():
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def step_profiler(warmup: int, steps: int, out: Path):
    """A trainer callback profiling ``steps`` optimizer steps after the first ``warmup`` with torch.profiler (fx bench
    profiles extra steps after the measured ones, so the profiler's overhead stays out of the numbers); writes the
    operators sorted by their own device time and by their own CPU time, and how busy the GPU was."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        profiler = None
        summary: dict[str, Any] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step != warmup + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            # kernels only (an operator's own device time would count its kernels twice)
            device_us = sum(e.self_device_time_total for e in events
                            if e.device_type == torch.autograd.DeviceType.CUDA)
            self.summary = {"profiled_steps": steps, "wall_s": wall, "device_busy_s": device_us / 1e6,
                            "device_busy": device_us / 1e6 / wall if wall else None}
            head = (f"{steps} steps after {warmup} warm-up: {wall:.3f} s wall, kernels {device_us / 1e6:.3f} s "
                    f"({self.summary['device_busy'] or 0:.0%} busy)\n\n")
            tables = [events.table(sort_by=key, row_limit=40) for key in ("self_device_time_total", "self_cpu_time_total")
                      if key == "self_cpu_time_total" or torch.cuda.is_available()]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(head + "\n\n".join(tables))
            print(head.strip(), f"(operator tables in {out})")
            self.profiler = None

    return StepProfiler()


def run(exp, steps: int, warmup: int, reference: bool = False, profile: Path | None = None) -> dict[str, Any]:
    """Benchmark ``exp``'s training loop for ``warmup + steps`` optimizer steps; the result as a dict."""
    import gc

    import torch

    from fx import memory, runner
    from fx.memory import GIB
    from fx.run import environment

    if steps < 1 or warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if reference and exp.method.cls.preference:
        raise UserError(f"--reference runs the plain SFT recipe; method {exp.method.name!r} trains on preference pairs "
                        "and has no plain counterpart to compare with")
    fitted = memory.fit(exp) or memory.plan_experiment(exp)  # the bench reports the estimate, so it needs one
    exp = fitted.exp
    prep = runner.prepare(exp)
    cap = memory.cap_allocator(fitted)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    method = exp.method.cls(exp.method.settings, None)
    started = time.perf_counter()
    model = method.load(prep.source, prep.tokenizer)
    load_s = time.perf_counter() - started
    timer = step_timer(sync)
    callbacks = [timer]
    profiled = 3 if profile else 0
    if profile:
        profiler = step_profiler(warmup + steps, profiled, profile)
        callbacks.append(profiler)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = method.trainer(model, prep.tokenizer, prep.train.rows, Path(tmp), exp.experiment.seed,
                                 callbacks=callbacks, max_steps=warmup + steps + profiled)
        try:
            trainer.train()
        except torch.OutOfMemoryError as exc:
            raise TrainingFailed(memory.out_of_memory(cap, exc)) from None
    measured = {**summarise(timer, warmup, warmup + steps), **memory_readings(torch), "load_s": load_s}
    if getattr(trainer, "graph_stats", None) is not None:
        measured["cuda_graphs"] = trainer.graph_stats
    if profile:
        measured["profile"] = profiler.summary
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mean_row = statistics.mean(n for r in prep.train.rows for n in trained_lengths(r))
    measured["flops_per_token"] = flops_per_token(fitted.plan.arch, n_lora, mean_row, exp.method.cls.preference)
    env = environment()
    peak = device_peak_tflops(env["hardware"])
    if peak:
        measured["mfu"] = measured["tokens_per_s"] * measured["flops_per_token"] / (peak * 1e12)
    resolved = exp.resolved()
    result: dict[str, Any] = {
        "kind": "fx-bench", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fx", *sys.argv[1:]]),
        **env, "steps": steps, "warmup": warmup,
        "config": resolved, "config_hash": _hash(workload_config(resolved)), "full_config_hash": _hash(resolved),
        "plan": fitted.summary(), "allocator_cap_gib": cap / GIB if cap else None,
        "peak_tflops": peak, "results": measured,
    }
    if reference:
        del trainer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        from fx import reference as plain

        ref = plain.run(prep, exp, steps, warmup, step_timer(sync))
        ref.update(memory_readings(torch))
        ref["flops_per_token"] = flops_per_token(fitted.plan.arch, ref.pop("trainable_params"), mean_row)
        if peak:
            ref["mfu"] = ref["tokens_per_s"] * ref["flops_per_token"] / (peak * 1e12)
        result["reference"] = ref
        result["fx_over_reference"] = {
            k: measured[k] / ref[k] for k in ("tokens_per_s", "tokens_per_s_overall", "peak_reserved_gib", "peak_allocated_gib")
            if ref.get(k)
        }
    return result


def device_peak_tflops(hardware: dict[str, Any]) -> float | None:
    from fx.memory import DEVICE_NAMES, GPUS

    name = hardware.get("gpu") or ""
    for marker, key in DEVICE_NAMES.items():
        if marker in name:
            return GPUS[key].peak_tflops
    return None


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result["results"]
    table = Table(title=f"fx bench: {result['config']['experiment']['name']} on {hardware_key(result['hardware'])}")
    table.add_column("metric")
    table.add_column("fx", justify="right")
    ref = result.get("reference")
    if ref:
        table.add_column("plain recipe", justify="right")
        table.add_column("fx / plain", justify="right")
    rows = [("tokens/s (real tokens; median of steps)", "tokens_per_s", "{:.0f}"),
            ("tokens/s (all measured steps)", "tokens_per_s_overall", "{:.0f}"), ("step time median (s)", "step_s_median", "{:.3f}"),
            ("step time p10 / p90 (s)", None, None), ("tokens per step", "tokens_per_step_mean", "{:.0f}"),
            ("peak GPU reserved (GiB)", "peak_reserved_gib", "{:.2f}"),
            ("peak GPU allocated (GiB)", "peak_allocated_gib", "{:.2f}"), ("peak CPU RSS (GiB)", "peak_rss_gib", "{:.2f}"),
            ("model FLOPs utilisation", "mfu", "{:.1%}")]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r['step_s_p10']:.3f} / {r['step_s_p90']:.3f}"]
            if ref:
                cells += [f"{ref['step_s_p10']:.3f} / {ref['step_s_p90']:.3f}", ""]
        else:
            cells = [fmt.format(r[key]) if key in r else "-"]
            if ref:
                ratio = result["fx_over_reference"].get(key)
                cells += [fmt.format(ref[key]) if key in ref else "-", f"{ratio:.2f}x" if ratio else ""]
        table.add_row(label, *cells)
    plan = result["plan"]
    table.caption = (f"planner: {plan['total_gib']:.2f} GiB total, {plan['reserved_gib']:.2f} GiB in the allocator"
                     + (f"; budget {plan['budget']} ({plan['budget_gib']:.2f} GiB)" if plan.get("budget") else "")
                     + (f"; allocator capped at {result['allocator_cap_gib']:.2f} GiB" if result.get("allocator_cap_gib") else "")
                     + f"; {r['measured_steps']} steps after {result['warmup']} warm-up")
    Console().print(table)
    graphed = r.get("cuda_graphs")
    if graphed:
        print(f"CUDA graphs: {graphed['captures']} buckets captured ({graphed['capture_s']:.1f} s), "
              f"{graphed['replays']} steps replayed, {graphed['eager_padded_steps']} eager"
              + (f"; capture failed: {graphed['failed']}" if graphed["failed"] else ""))
    if r["step_s_p90"] > 2 * r["step_s_median"]:
        print(f"note: step times vary widely (p90 {r['step_s_p90']:.2f} s, median {r['step_s_median']:.2f} s): first-use "
              "work (Triton compiling a kernel, a CUDA graph captured for a new length bucket) may fall inside the "
              "measured steps, and token budgets split the longest batches; raise --steps or --warmup")


def write_result(path: Path, result: dict[str, Any]) -> None:
    from fx.run import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2, default=str) + "\n")


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such benchmark result") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a benchmark result (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("kind") != "fx-bench" or "results" not in data:
        raise UserError(f"{path}: not an fx bench result")
    return data


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: float) -> int:
    """Print a side-by-side table; 1 when throughput fell or memory rose beyond ``tolerance``, else 0.
    Results from different hardware or workloads are refused (UserError, exit 2)."""
    from rich.console import Console
    from rich.table import Table

    before, after = hardware_key(baseline["hardware"]), hardware_key(current["hardware"])
    if before != after:
        raise UserError(f"cannot compare: the baseline ran on {before}, this result on {after}; "
                        "benchmark the baseline on the same hardware")
    if _hash(workload_config(baseline["config"])) != _hash(workload_config(current["config"])):
        diff = config_diff(workload_config(baseline["config"]), workload_config(current["config"]))
        raise UserError("cannot compare: the workloads differ (" + "; ".join(diff[:6]) + "); "
                        "compare results of the same experiment")
    table = Table(title=f"fx bench compare (tolerance {tolerance:.0%})")
    for column in ("metric", "baseline", "current", "change", "verdict"):
        table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
    failed = []
    for key, (label, higher_better) in {**GATED, **SHOWN}.items():
        old, new = baseline["results"].get(key), current["results"].get(key)
        if old is None or new is None:
            continue
        change = (new - old) / old if old else 0.0
        worse = -change if higher_better else change
        if key in GATED and worse > tolerance:
            verdict = "REGRESSION"
            failed.append(label)
        else:
            verdict = "ok" if key in GATED else "(not gated)"
        table.add_row(label, f"{old:.4g}", f"{new:.4g}", f"{change:+.1%}", verdict,
                      style="red bold" if verdict == "REGRESSION" else None)
    execution = config_diff(baseline["config"], current["config"])
    if execution:
        table.caption = "run differently: " + "; ".join(execution[:6])
    Console().print(table)
    if failed:
        print(f"regression beyond {tolerance:.0%}: {', '.join(failed)}")
        return 1
    print(f"no regression beyond {tolerance:.0%}")
    return 0


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, path + ".")
        elif va != vb:
            out.append(f"{path}: {va!r} -> {vb!r}")
    return out
