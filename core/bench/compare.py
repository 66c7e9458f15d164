"""Bench results: written and read back, printed as a table, and compared with a baseline (the regression gate).

A result records two hashes: ``full_config_hash`` of the whole resolved experiment, and ``config_hash`` of its
workload (model, data, template, method and its effective batch), leaving out how it is executed (micro-batch
split, the method's execution keys, budget, trackers). ``--compare`` refuses results of other hardware or other
workloads: it catches a regression in how the same workload runs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from fx.config.diff import describe
from fx.errors import UserError
from fx.files import write_atomic
from fx.hooks import manager

# resolved-config keys that change how a workload runs, not what it computes
EXECUTION_KEYS = {
    "experiment": ("output_dir", "description"),
    "method": ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "logging_steps", "optim"),
}
IGNORED_SECTIONS = ("trackers", "stages", "budget", "distributed")

# metric -> (label, higher is better)
GATED = {
    "tokens_per_s_overall": ("tokens/s, all steps", True),
    "tokens_per_s": ("tokens/s, median step", True),
    "peak_reserved_gib": ("peak GPU reserved (GiB)", False),
    "peak_allocated_gib": ("peak GPU allocated (GiB)", False),
}
SHOWN = {
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
    methods = manager.get()["methods"]
    return methods[name].cls.execution_keys() if name in methods else ()


def workload_hash(resolved: dict[str, Any]) -> str:
    return _hash(workload_config(resolved))


def full_hash(resolved: dict[str, Any]) -> str:
    return _hash(resolved)


def hardware_key(hardware: dict[str, Any]) -> str:
    if hardware.get("cuda"):
        return f"{hardware.get('gpu')} ({hardware.get('gpu_memory_gib')} GiB)"
    return f"cpu: {hardware.get('platform')}, {hardware.get('cpu_count')} cores"


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result["results"]
    ranks = result.get("world_size", 1)
    table = Table(title=f"fx bench: {result['config']['experiment']['name']} on {hardware_key(result['hardware'])}"
                  + (f" x {ranks} ranks ({result.get('strategy')}; memory: the largest rank's)" if ranks > 1 else ""))
    table.add_column("metric")
    table.add_column("fx", justify="right")
    ref = result.get("reference")
    if ref:
        table.add_column("plain recipe", justify="right")
        table.add_column("fx / plain", justify="right")
    rows = [("tokens/s (real tokens, all measured steps)", "tokens_per_s_overall", "{:.0f}"),
            ("tokens/s (median of the steps' rates)", "tokens_per_s", "{:.0f}"),
            ("step time median (s)", "step_s_median", "{:.3f}"),
            ("step time p10 / p90 (s)", None, None), ("tokens per step", "tokens_per_step_mean", "{:.0f}"),
            ("peak GPU reserved (GiB)", "peak_reserved_gib", "{:.2f}"),
            ("peak GPU allocated (GiB)", "peak_allocated_gib", "{:.2f}"),
            ("peak CPU RSS (GiB)", "peak_rss_gib", "{:.2f}"),
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
                     + (f"; allocator capped at {result['allocator_cap_gib']:.2f} GiB"
                        if result.get("allocator_cap_gib") else "")
                     + f"; {r['measured_steps']} steps after {result['warmup']} warm-up")
    Console().print(table)
    graphed = r.get("cuda_graphs")
    if graphed:
        print(f"CUDA graphs: {graphed['captures']} buckets captured ({graphed['capture_s']:.1f} s), "
              f"{graphed['replays']} steps replayed, {graphed['eager_padded_steps']} eager"
              + (f"; capture failed: {graphed['failed']}" if graphed["failed"] else ""))
    if r["step_s_p90"] > 2 * r["step_s_median"]:
        print(f"note: step times vary widely (p90 {r['step_s_p90']:.2f} s, median {r['step_s_median']:.2f} s): "
              "first-use work (Triton compiling a kernel, a CUDA graph captured for a new length bucket) may fall "
              "inside the measured steps, and token budgets split the longest batches; raise --steps or --warmup")


def write_result(path: Path, result: dict[str, Any]) -> None:
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
    if workload_hash(baseline["config"]) != workload_hash(current["config"]):
        diff = describe(workload_config(baseline["config"]), workload_config(current["config"]))
        raise UserError("cannot compare: the workloads differ (" + "; ".join(diff[:6]) + "); "
                        "compare results of the same experiment")
    if baseline.get("world_size", 1) != current.get("world_size", 1):
        return scaling(baseline, current)
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
    execution = describe(baseline["config"], current["config"])
    if execution:
        table.caption = "run differently: " + "; ".join(execution[:6])
    Console().print(table)
    if failed:
        print(f"regression beyond {tolerance:.0%}: {', '.join(failed)}")
        return 1
    print(f"no regression beyond {tolerance:.0%}")
    return 0


def scaling(baseline: dict[str, Any], current: dict[str, Any]) -> int:
    """The same workload on another number of GPUs: its speed-up and scaling efficiency (speed-up / GPU ratio), and
    the largest rank's memory against the baseline's. A report, not a gate: 0."""
    n0, n1 = baseline.get("world_size", 1), current.get("world_size", 1)
    old, new = baseline["results"], current["results"]
    speedup = new["tokens_per_s_overall"] / old["tokens_per_s_overall"]
    print(f"scaling: {n1} GPUs ({current.get('strategy')}) at {new['tokens_per_s_overall']:.0f} tokens/s against "
          f"{n0} at {old['tokens_per_s_overall']:.0f}: {speedup:.2f}x, efficiency {speedup / (n1 / n0):.0%}")
    if old.get("peak_reserved_gib") and new.get("peak_reserved_gib"):
        change = new["peak_reserved_gib"] / old["peak_reserved_gib"] - 1
        print(f"peak GPU reserved, largest rank: {new['peak_reserved_gib']:.2f} GiB against "
              f"{old['peak_reserved_gib']:.2f} GiB ({change:+.1%})")
    return 0


def percent(text: str) -> float:
    """``--tolerance``: 5% or 0.05."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage like 5% or 0.05") from None
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value
