"""``fx bench``: the experiment's own training loop, timed, with its memory measured (docs/benchmarks.md).

Tokens are real tokens (padding excluded). Step times are taken between the trainer's step callbacks with the GPU
synchronised, after ``warmup`` unmeasured steps. ``tokens_per_s_overall`` divides all measured tokens by all measured
time (captures, compiles and stalls included: the headline); ``tokens_per_s``, the median of the steps' own rates,
is a diagnostic. MFU counts the work the model must do per real token (:func:`flops_per_token`), not recomputation.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fx.bench import reference as plain
from fx.bench.compare import full_hash, workload_hash
from fx.data.prepare import prepare
from fx.errors import TrainingFailed, UserError
from fx.plan.gpus import GIB, known_device
from fx.run.directory import environment, peak_rss_gib
from fx.training import budget, contract, distributed
from fx.training.method import Session
from fx.training.oom import out_of_memory


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


def flops_per_token(arch, n_lora: int, mean_row: float, no_grad_forwards: int = 0) -> float:
    """Model FLOPs per real token of one training step, not counting recomputation: 2 per frozen weight for the
    forward, 2 more for the input gradient, 6 per LoRA weight, and causal attention's 2 x 2 x layers x hidden x
    (row length / 2) forward, three times over for forward and backward. Each no-grad forward of the batch's size (a
    reference's with the adapter off; KTO's KL batch through the policy and the reference) adds a forward of the
    frozen weights and of attention."""
    frozen = arch.layers * sum(i * o for i, o in arch.linears().values()) + arch.vocab * arch.hidden  # with lm_head
    attention = 2 * 2 * arch.layers * arch.hidden * (mean_row / 2)
    return 4 * frozen + 6 * n_lora + 3 * attention + no_grad_forwards * (2 * frozen + attention)


def no_grad_forwards(work) -> int:
    """The no-grad forwards of a step beside the trained one (:class:`fx.plan.shapes.Workload`)."""
    return int(work.reference_forward) + 2 * int(work.kl_forward)


def trained_lengths(row: dict[str, list[int]]) -> list[int]:
    """The sequences one row trains as: its ids, a preference pair's prompt with each of its two answers, or an
    unpaired row's prompt with its answer."""
    if "input_ids" in row:
        return [len(row["input_ids"])]
    if "completion_ids" in row:
        return [len(row["prompt_ids"]) + len(row["completion_ids"])]
    return [len(row["prompt_ids"]) + len(row[f"{side}_ids"]) for side in ("chosen", "rejected")]


def summarise(timer, warmup: int, end: int | None = None) -> dict[str, Any]:
    times, tokens = timer.times[warmup:end], timer.tokens[warmup:end]
    if not times:
        raise UserError(f"no measured steps: the run stopped after {len(timer.times)} step(s), "
                        "at or before the warm-up")
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
            tables = [events.table(sort_by=key, row_limit=40)
                      for key in ("self_device_time_total", "self_cpu_time_total")
                      if key == "self_cpu_time_total" or torch.cuda.is_available()]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(head + "\n\n".join(tables))
            print(head.strip(), f"(operator tables in {out})")
            self.profiler = None

    return StepProfiler()


def run(exp, steps: int, warmup: int, reference: bool = False, profile: Path | None = None) -> dict[str, Any]:
    """Benchmark ``exp``'s training loop for ``warmup + steps`` optimizer steps; the result as a dict."""

    import torch


    if steps < 1 or warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    world = distributed.current()
    if reference and world.size > 1:
        raise UserError("--reference runs the plain recipe in one process; leave out --gpus to compare with it")
    if reference and (exp.method.cls.preference or exp.method.cls.unpaired):
        raise UserError(f"--reference runs the plain SFT recipe; method {exp.method.name!r} trains on preference "
                        f"{'pairs' if exp.method.cls.preference else 'rows'} and has no plain counterpart to compare "
                        "with")
    fitted = budget.fit(exp) or budget.plan_experiment(exp)  # the bench reports the estimate, so it needs one
    exp = fitted.exp
    prep = prepare(exp)
    cap = budget.cap_allocator(fitted)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    method = prep.method
    started = time.perf_counter()
    model = method.load(prep.source, prep.tokenizer)
    load_s = time.perf_counter() - started
    timer = step_timer(sync)
    callbacks = [timer]
    profile = profile if world.main else None  # one rank's operators are every rank's
    profiled = 3 if profile else 0
    if profile:
        profiler = step_profiler(warmup + steps, profiled, profile)
        callbacks.append(profiler)
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(output_dir=Path(tmp), seed=exp.experiment.seed, max_steps=warmup + steps + profiled)
        trainer = contract.build(method, model, prep.tokenizer, prep.train.rows, session, callbacks=callbacks)
        try:
            trainer.train()
        except torch.OutOfMemoryError as exc:
            raise TrainingFailed(out_of_memory(cap, exc)) from None
    measured = {**summarise(timer, warmup, warmup + steps), **memory_readings(torch), "load_s": load_s}
    if world.size > 1:  # tokens are every rank's already; memory is each rank's own, gated on the largest
        measured["per_rank"] = distributed.gather({"rank": world.rank, **memory_readings(torch)})
        for key in ("peak_reserved_gib", "peak_allocated_gib", "peak_rss_gib"):
            if key in measured:
                measured[key] = max(r[key] for r in measured["per_rank"])
    if getattr(trainer, "graph_stats", None) is not None:
        measured["cuda_graphs"] = trainer.graph_stats
    if profile:
        measured["profile"] = profiler.summary
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mean_row = statistics.mean(n for r in prep.train.rows for n in trained_lengths(r))
    measured["flops_per_token"] = flops_per_token(fitted.plan.arch, n_lora, mean_row,
                                                  no_grad_forwards(fitted.plan.work))
    env = environment()
    peak = device_peak_tflops(env["hardware"])
    if peak:
        measured["mfu"] = measured["tokens_per_s_overall"] * measured["flops_per_token"] / (peak * 1e12 * world.size)
    resolved = exp.resolved()
    result: dict[str, Any] = {
        "kind": "fx-bench", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fx", *sys.argv[1:]]),
        **env, "steps": steps, "warmup": warmup,
        "world_size": world.size, "strategy": world.strategy,
        "config": resolved, "config_hash": workload_hash(resolved), "full_config_hash": full_hash(resolved),
        "plan": fitted.summary(), "allocator_cap_gib": cap / GIB if cap else None,
        "peak_tflops": peak, "results": measured,
    }
    if reference:
        del trainer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timer = step_timer(sync)
        ref = {**plain.run(prep, exp, steps, warmup, timer), **summarise(timer, warmup), **memory_readings(torch)}
        ref["flops_per_token"] = flops_per_token(fitted.plan.arch, ref.pop("trainable_params"), mean_row)
        if peak:
            ref["mfu"] = ref["tokens_per_s_overall"] * ref["flops_per_token"] / (peak * 1e12)
        result["reference"] = ref
        result["fx_over_reference"] = {
            k: measured[k] / ref[k]
            for k in ("tokens_per_s", "tokens_per_s_overall", "peak_reserved_gib", "peak_allocated_gib")
            if ref.get(k)
        }
    return result


def device_peak_tflops(hardware: dict[str, Any]) -> float | None:
    gpu = known_device(hardware.get("gpu") or "")
    return gpu.peak_tflops if gpu else None
