"""``fx run``: plan -> data -> run folder -> load -> evaluate -> train -> save -> evaluate -> samples -> merge ->
export.

Everything a user can get wrong (the file, the plugins, the data rows, the template, the budget) is checked before
the run folder exists, so a refused run leaves nothing behind. Once training starts, a failure still leaves the
folder with what was written so far and a summary that says what happened.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fx.after import fidelity
from fx.after.export import export, report
from fx.after.merge import merge
from fx.config import Experiment
from fx.data.formats import to_row
from fx.data.prepare import Prepared, prepare
from fx.data.report import length_histogram
from fx.data.tokenize import prompt_of
from fx.errors import Interrupted, UserError
from fx.evaluation import generate
from fx.files import write_atomic
from fx.plan.gpus import GIB
from fx.run import launch
from fx.run.directory import RunDir, peak_rss_gib
from fx.run.plots import write_loss_plot
from fx.run.run import Run, Summary
from fx.run.tracking import TrackerHub
from fx.training import budget, contract, distributed, oom
from fx.training.checkpoints import last_checkpoint, ranks_of
from fx.training.method import Session

SUMMARY_EVERY_S = 30  # while training, summary.json is rewritten at most this often (steps done, wall time)


def sample_prompts(exp: Experiment, prep: Prepared) -> tuple[list[list[dict]], str]:
    """The conversations samples.md answers, and a sentence saying where they came from."""
    settings = exp.stages.generate
    if settings.prompts:
        return ([[{"role": "user", "content": p}] for p in settings.prompts],
                f"the {len(settings.prompts)} prompts of the experiment's `[stages.generate] prompts`")
    pairs = [prompt_of(prep.template, e) for e in prep.held_out_examples]
    prompts = [p[0] for p in pairs if p is not None][: settings.count]
    return prompts, (f"the first {len(prompts)} of the run's {len(prep.held_out_examples)} held-out rows "
                     "(heldout.jsonl), up to `[stages.generate] count`")


def write_samples(path: Path, prompts: list[list[dict]], origin: str, before: list[str], after: list[str],
                  max_new_tokens: int) -> None:
    lines = ["# Samples", "",
             f"Greedy answers (at most {max_new_tokens} new tokens) before and after training, prompted in the run's "
             f"template. The prompts are {origin}.", ""]
    for i, (conv, b, a) in enumerate(zip(prompts, before, after), 1):
        lines += [f"## {i}. {conv[-1]['content']}", "", "**Before:**", "", b or "_(empty)_", "", "**After:**", "",
                  a or "_(empty)_", ""]
    write_atomic(path, "\n".join(lines))


UNSHARDED = "_(not generated: under FSDP the model is sharded only once training starts)_"


def resume_command(folder: Path) -> str:
    size = distributed.current().size
    return f"fx run --resume {folder}" + (f" --gpus {size}" if size > 1 else "")


def _peaks(rank: int) -> dict[str, Any]:
    """This rank's peak memory so far."""
    import torch

    cuda = torch.cuda.is_available()
    return {"rank": rank, "peak_vram_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
            "peak_rss_gib": peak_rss_gib()}


def interrupted_at(run: Run) -> str:
    """What a SIGINT outside the checkpointed steps (before or after training, or a second one during it) left,
    and how to go on."""
    where = run.current_stage or "setup"
    resume = f"Resume with: {resume_command(run.dir)}"
    if where == "train":
        return (f"stopped at once by a second SIGINT at step {run.step}; the last complete checkpoint is kept. "
                f"{resume}")
    if run.files.adapter.is_dir():
        return f"interrupted during the {where} stage, after training (the adapter is saved). {resume}"
    return f"interrupted during the {where} stage, before training; nothing was trained yet. {resume}"


def _measure_peaks(summary: Summary) -> None:
    import torch

    cuda = torch.cuda.is_available()
    summary["peak_vram_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None
    summary["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    summary["peak_rss_gib"] = peak_rss_gib()


def execute(exp: Experiment, plugins, resume: Path | None = None) -> Path:
    """Run the experiment (or continue the run in ``resume``); return the run folder."""
    import torch

    started = time.perf_counter()
    fitted = budget.fit(exp)  # refuses a run over its budget before anything is loaded
    exp = fitted.exp if fitted else exp
    prep = prepare(exp)
    world = distributed.current()  # on several GPUs, rank 0 alone writes the folder and talks to plugins
    if resume is None:
        made = RunDir.create(Path(exp.experiment.output_dir), exp.experiment.name).path if world.main else None
        folder = RunDir(distributed.share(made))
    else:
        folder = RunDir(resume)
    if world.main:
        launch.note_run(folder.path)
    previous = folder.read_summary() if resume is not None else {}
    found = last_checkpoint(folder.checkpoints) if resume is not None else None
    if found:
        resumable(found[0], world)
    run = Run(folder, exp.resolved(), plugins, resume_step=found[1] if found else None, main=world.main)
    created = previous.get("created") or datetime.now().isoformat(timespec="seconds")  # kept across resumptions
    if world.main:
        folder.write_heldout([to_row(e) for e in prep.held_out_examples])
        folder.write_setup(exp.resolved(), {"experiment_file": str(exp.path.resolve()),
                                            "base_dir": str(exp.base_dir), "created": created})
        length_histogram(prep.train.lengths + prep.held_out.lengths, exp.data.max_length, folder.lengths,
                         f"{exp.experiment.name}: template {exp.template.name!r}")
    hub = TrackerHub({t.name: t.cls(t.settings, run) for t in exp.trackers} if world.main else {})
    if world.main:
        plugins.pm.register(hub, name=f"fx.trackers.active.{run.name}")
    segments = previous.get("segments") or ([{"started": previous["started"], "wall_s": previous.get("wall_s")}]
                                            if "started" in previous else [])  # a summary from before segments
    segment = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_step": run.resume_step or 0,
               "to_step": run.resume_step or 0, "wall_s": 0.0}
    summary = Summary(
        folder if world.main else None, started_at=started, earlier_wall_s=previous.get("wall_s", 0.0),
        name=run.name, status="running", created=created, segments=[*segments, segment],
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=exp.model.name, method=exp.method.name, template=exp.template.name, world_size=world.size,
        data={"train_rows": len(prep.train.rows), "eval_rows": len(prep.held_out.rows),
              "truncated": prep.train.truncated + prep.held_out.truncated,
              "dropped": prep.train.dropped + prep.held_out.dropped},
    )
    if run.resume_step is not None:
        summary["resumed_from_step"] = run.resume_step
        # what the run had trained stays on record until the resumed training measures it again (a resume that
        # fails must not leave a summary that has lost its steps and loss)
        summary.update({key: previous[key] for key in ("steps", "train_loss") if key in previous})
    if world.size > 1:
        summary["distributed"] = distributed.describe(world, exp.method.settings)
        if world.main and "message" in summary["distributed"]:
            print(f"fx: {summary['distributed']['message']}", file=sys.stderr)
    summary.write()  # a run killed before its end (kill -9 of a rank, say) still has a summary saying what it was
    error: BaseException | None = None
    try:
        if world.main:
            plugins.hook.fx_run_start(run=run)
        cap = budget.cap_allocator(fitted)
        if fitted:
            summary["memory_plan"] = {**fitted.summary(), "allocator_cap_gib": round(cap / GIB, 3) if cap else None}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _stages(exp, prep, run, summary, previous, fitted, cap, found[0] if found else None)
        summary["status"] = "completed"
    except BaseException as exc:
        error = exc
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            summary["status"] = "interrupted"
        elif summary["status"] == "running":
            summary["status"] = "failed"
        if summary["status"] != "interrupted":
            summary["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(interrupted_at(run), signal.SIGINT) from None
        raise
    finally:
        segment["to_step"] = max(segment["to_step"], run.progress.step)
        summary.stop_clock()
        _measure_peaks(summary)
        if world.main:
            _finish(run, summary, hub, plugins, error)
    return folder.path


def _finish(run: Run, summary: Summary, hub: TrackerHub, plugins, error: BaseException | None) -> None:
    try:  # the plot is a view of the run; a plotting failure must not hide how the run itself ended
        write_loss_plot(run.history, run.files.loss_plot, f"{run.name} ({summary['status']})")
    except Exception as exc:
        summary["plot_error"] = f"{type(exc).__name__}: {exc}"
        print(f"fx: could not write plots/loss.png: {summary['plot_error']}", file=sys.stderr)
    summary.write()
    plugins.hook.fx_run_end(run=run, summary=dict(summary), error=error)
    if hub.failed:
        summary["trackers_failed"] = hub.failed
        summary.write()
    plugins.pm.unregister(hub)


def _measure_trained(model, prep: Prepared, exp: Experiment) -> dict[str, Any] | None:
    """The trained model's held-out measurements, as fx.after.fidelity measures a merged or exported one (None:
    no held-out rows)."""
    if not prep.held_out_examples:
        return None
    return fidelity.measure(model, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples,
                            exp.stages.evaluate)


def resumable(checkpoint: Path, world: distributed.World) -> None:
    """Refuse a checkpoint this world can't load: FSDP's sharded checkpoints load under FSDP on as many ranks, and
    one process's or DDP's checkpoints anywhere but under FSDP."""
    wrote = ranks_of(checkpoint) or {"world_size": 1, "strategy": None}
    size, strategy = int(wrote["world_size"]), wrote["strategy"]
    if (strategy == "fsdp") == (world.strategy == "fsdp") and (strategy != "fsdp" or size == world.size):
        return
    how = f"--gpus {size} --set distributed.strategy={strategy}" if strategy == "fsdp" else (
        f"--gpus {size}" if size > 1 else "in one process")
    raise UserError(f"{checkpoint} was written by {size} rank(s) under {strategy or 'one process'}, which this run "
                    f"({world.size} rank(s), {world.strategy or 'one process'}) can't load; resume with {how}")


def _stages(exp: Experiment, prep: Prepared, run: Run, summary: Summary, previous: dict[str, Any],
            fitted, cap: float | None, resume_from: Path | None) -> None:
    import torch
    from transformers import set_seed

    set_seed(exp.experiment.seed)  # adapters are initialised at random when the model loads
    method = exp.method.cls(exp.method.settings)
    world = distributed.current()
    sharded = world.strategy == "fsdp"  # the model is sharded when training starts: before it, nothing runs it
    with run.stage("load") as result:
        model = method.load(prep.source, prep.tokenizer)
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evaluating = exp.stages.evaluate.enabled and bool(prep.held_out.rows)

    def evaluate_stage(when: str, step: int) -> None:
        """Held-out measurements into summary.json (``eval_before``/``eval_after``) and to the trackers."""
        with run.stage(f"evaluate_{when}") as result:
            result.update(method.evaluate(model, prep.tokenizer, prep.template, prep.held_out.rows,
                                          prep.held_out_examples, exp.stages.evaluate))
        summary[f"eval_{when}"] = result
        summary.write()
        run.log(step, {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})

    prompts, origin = sample_prompts(exp, prep) if exp.stages.generate.enabled else ([], "")
    if evaluating and "eval_before" in previous:
        summary["eval_before"] = previous["eval_before"]  # measured before the run was interrupted
    elif evaluating and not sharded:
        evaluate_stage("before", 0)
    before: list[str] = [UNSHARDED] * len(prompts) if sharded else []
    if prompts and not sharded:
        with run.stage("generate_before"):
            before = generate(model, prep.tokenizer, prep.template, prompts, exp.stages.generate.max_new_tokens)
    checkpoints = exp.checkpoints
    session = Session(output_dir=run.files.checkpoints, seed=exp.experiment.seed,
                      checkpoint_every=checkpoints.every_steps, checkpoint_keep=checkpoints.keep)
    segment, written = summary["segments"][-1], [time.perf_counter()]

    def log(step: int, metrics: dict[str, float]) -> None:
        """To the trackers; and now and then into summary.json, so that a killed run still says how far it got."""
        run.log(step, metrics)
        segment["to_step"] = step
        if time.perf_counter() - written[0] >= SUMMARY_EVERY_S:
            summary.write()
            written[0] = time.perf_counter()

    with run.stage("train") as result:
        try:
            result.update(contract.train(method, model, prep.tokenizer, prep.train.rows, session, run.progress,
                                         log, resume_from, trained_with=exp.resolved()))
        except torch.OutOfMemoryError as exc:
            summary["status"] = "out_of_memory"
            raise oom.failure(run.progress, fitted, cap, run.files.checkpoints, resume_command(run.dir),
                              exp.method.cls.execution_keys()) from exc
    summary.update(result)
    if world.size > 1:
        summary["per_rank"] = distributed.gather(_peaks(world.rank))
    summary.write()
    stopped = run.progress.stop_signal
    if stopped is not None:
        raise Interrupted(f"stopped by {signal.Signals(stopped).name} after step {result.get('steps')}; checkpoint "
                          f"written. Resume with: {resume_command(run.dir)}", stopped)
    with run.stage("save") as result, distributed.whole_state(model):
        if world.main:
            run.files.save_adapter(lambda folder: method.save(model, folder))
        result["adapter"] = str(run.files.adapter)
    if evaluating:
        evaluate_stage("after", summary.get("steps", 0))
    if prompts:
        with run.stage("generate_after"):
            after = generate(model, prep.tokenizer, prep.template, prompts, exp.stages.generate.max_new_tokens)
        if world.main:
            write_samples(run.files.samples, prompts, origin, before, after, exp.stages.generate.max_new_tokens)
    trained = None  # the trained model measured as the merged model and the export will be (fx.after.fidelity)
    if exp.stages.merge.enabled and world.main:
        settings = exp.stages.merge
        with run.stage("merge") as result:
            trained = _measure_trained(model, prep, exp)
            model = None  # the 4-bit model leaves memory before the base comes in
            result.update(merge(exp, run.dir, run.files.merged, settings.dtype, base=settings.base, adapter=trained))
        summary["merge"] = result
        summary.write()
        fidelity.report(result, sys.stderr)
    if exp.stages.export.enabled and world.main:
        with run.stage("export") as result:
            if model is not None:
                trained = _measure_trained(model, prep, exp)
                model = None
            result.update(export(exp, run.dir, exp.stages.export.format, exp.stages.export.quant, adapter=trained))
        summary["exports"] = [dict(result)]
        summary.write()
        if result["check"]["passed"] is False:
            print(f"fx: {report(dict(result))}", file=sys.stderr)
