"""fx's own stages: load, evaluate, generate, train, save, merge, export, each one class over the run's context.

Each fills its own typed fields of the run's record (fx.run.record.RunSummary); their order is declared in
fx.stages.BUILTIN.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

from fx.after import fidelity, gguf_file
from fx.after.export import export, modelfile, report
from fx.after.export import record as record_export
from fx.after.inference import trained_measure
from fx.after.merge import merge
from fx.after.merge import record as record_merge
from fx.data.tokenize import prompt_of
from fx.errors import Interrupted, UserError
from fx.evaluation import generate
from fx.files import write_atomic
from fx.run.directory import peak_rss_gib
from fx.run.record import Samples
from fx.stages.base import Stage
from fx.stages.benchmark import Benchmark
from fx.training import contract, distributed, oom
from fx.training.method import Session

SUMMARY_EVERY_S = 30  # while training, summary.json is rewritten at most this often (steps done, wall time)
UNSHARDED = "_(not generated: under FSDP the model is sharded only once training starts)_"
PENDING = "_(not generated yet)_"


def sharded() -> bool:
    """Under FSDP the model is sharded when training starts: before it, nothing runs it."""
    return distributed.current().strategy == "fsdp"


def saved(ctx) -> bool:
    """Whether the earlier segment of a resumed run trained and saved the adapter that is still in adapter/."""
    return ctx.done("train") and ctx.done("save") and ctx.folder.adapter.is_dir()


def resume_command(folder) -> str:
    size = distributed.current().size
    return f"fx run --resume {folder}" + (f" --gpus {size}" if size > 1 else "")


class Own(Stage):
    """fx's own stages fill their typed fields of the record in :meth:`run`."""

    def record(self, ctx, result: dict[str, Any]) -> None:
        pass


class Load(Own):
    name = "load"
    description = "the model, as the method trains it (a resumed run whose adapter was saved: the trained model)"
    needs = ("prep", "method")
    records = ("trainable_params",)
    always = True

    def run(self, ctx) -> dict[str, Any]:
        from transformers import set_seed

        if saved(ctx):
            ctx.model, ctx.trained = ctx.method.load_trained(ctx.source, ctx.folder.adapter), True
            return {"trainable_params": ctx.summary.trainable_params}
        set_seed(ctx.exp.experiment.seed)  # adapters are initialised at random when the model loads
        ctx.model = ctx.method.load(ctx.source, ctx.tokenizer)
        ctx.summary.trainable_params = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        return {"trainable_params": ctx.summary.trainable_params}


class Evaluate(Own):
    """Held-out measurements into the record (``eval_before``/``eval_after``) and to the trackers."""

    needs = ("model", "prep")

    def __init__(self, when: str):
        super().__init__()
        self.when, self.name = when, f"evaluate_{when}"
        self.records = (f"eval_{when}",)
        self.description = f"held-out loss and the task metric, {when} training ([stages.evaluate])"

    def enabled(self, ctx) -> bool:
        return ctx.exp.stages.evaluate.enabled and bool(ctx.prep.held_out.rows) and (
            self.when == "after" or not sharded())

    def run(self, ctx) -> dict[str, Any]:
        prep = ctx.prep
        result = ctx.method.evaluate(ctx.model, prep.tokenizer, prep.template, prep.held_out.rows,
                                     prep.held_out_examples, ctx.exp.stages.evaluate)
        setattr(ctx.summary, f"eval_{self.when}", result)
        ctx.run.log((ctx.summary.steps or 0) if self.when == "after" else 0,
                    {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        return result


def sample_prompts(exp, prep) -> tuple[list[list[dict]], str]:
    """The conversations samples.md answers, and a sentence saying where they came from."""
    settings = exp.stages.generate
    if settings.prompts:
        return ([[{"role": "user", "content": p}] for p in settings.prompts],
                f"the {len(settings.prompts)} prompts of the experiment's `[stages.generate] prompts`")
    pairs = [prompt_of(prep.template, e) for e in prep.held_out_examples]
    prompts = [p[0] for p in pairs if p is not None][: settings.count]
    return prompts, (f"the first {len(prompts)} of the run's {len(prep.held_out_examples)} held-out rows "
                     "(heldout.jsonl), up to `[stages.generate] count`")


def write_samples(path, samples: Samples, max_new_tokens: int) -> None:
    lines = ["# Samples", "",
             f"Greedy answers (at most {max_new_tokens} new tokens) before and after training, prompted in the run's "
             f"template. The prompts are {samples.origin}.", ""]
    before = samples.before or [PENDING] * len(samples.prompts)
    after = samples.after or [PENDING] * len(samples.prompts)
    for i, (prompt, b, a) in enumerate(zip(samples.prompts, before, after), 1):
        lines += [f"## {i}. {prompt}", "", "**Before:**", "", b or "_(empty)_", "", "**After:**", "",
                  a or "_(empty)_", ""]
    write_atomic(path, "\n".join(lines))


class Generate(Own):
    """Greedy answers to the sample prompts into the record (``samples``) and samples.md."""

    needs = ("model", "prep")
    records = ("samples",)

    def __init__(self, when: str):
        super().__init__()
        self.when, self.name = when, f"generate_{when}"
        self.description = f"greedy answers to the sample prompts, {when} training, in samples.md ([stages.generate])"

    def enabled(self, ctx) -> bool:
        return ctx.exp.stages.generate.enabled and bool(sample_prompts(ctx.exp, ctx.prep)[0])

    def run(self, ctx) -> dict[str, Any]:
        settings = ctx.exp.stages.generate
        prompts, origin = sample_prompts(ctx.exp, ctx.prep)
        if self.when == "before" and sharded():
            answers = [UNSHARDED] * len(prompts)
        else:
            answers = generate(ctx.model, ctx.tokenizer, ctx.template, prompts, settings.max_new_tokens)
        samples = ctx.summary.samples or Samples(prompts=[c[-1]["content"] for c in prompts], origin=origin)
        ctx.summary.samples = samples.model_copy(update={self.when: answers})
        if distributed.current().main:
            write_samples(ctx.folder.samples, ctx.summary.samples, settings.max_new_tokens)
        return {}


def _peaks(rank: int) -> dict[str, Any]:
    """This rank's peak memory so far."""
    import torch

    cuda = torch.cuda.is_available()
    return {"rank": rank, "peak_vram_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
            "peak_rss_gib": peak_rss_gib()}


class Train(Own):
    name = "train"
    description = "the method's trainer under the run contract (checkpoints, resume, signals, out-of-memory report)"
    needs = ("model", "prep", "method")
    records = ("steps", "train_loss", "train_tokens", "train_tokens_per_s", "train_wall_s")

    def done(self, ctx) -> bool:
        return saved(ctx)

    def run(self, ctx) -> dict[str, Any]:
        import torch

        exp, run, summary = ctx.exp, ctx.run, ctx.summary
        session = Session(output_dir=run.files.checkpoints, seed=exp.experiment.seed,
                          checkpoint_every=exp.checkpoints.every_steps, checkpoint_keep=exp.checkpoints.keep)
        segment, written = summary.segments[-1], [time.perf_counter()]

        def log(step: int, metrics: dict[str, float]) -> None:
            """To the trackers; and now and then into summary.json, so that a killed run says how far it got."""
            run.log(step, metrics)
            segment.to_step = step
            if time.perf_counter() - written[0] >= SUMMARY_EVERY_S:
                ctx.record.write()
                written[0] = time.perf_counter()

        try:
            result = contract.train(ctx.method, ctx.model, ctx.tokenizer, ctx.prep.train.rows, session, run.progress,
                                    log, ctx.resume_from, trained_with=exp.resolved())
        except torch.OutOfMemoryError as exc:
            summary.status = "out_of_memory"
            raise oom.failure(run.progress, ctx.fitted, ctx.cap, run.files.checkpoints, resume_command(run.dir),
                              exp.method.cls.execution_keys()) from exc
        ctx.trained = True
        for key, value in result.items():
            setattr(summary, key, value)
        world = distributed.current()
        if world.size > 1:
            summary.per_rank = distributed.gather(_peaks(world.rank))
        stopped = run.progress.stop_signal
        if stopped is not None:
            ctx.record.write()
            raise Interrupted(f"stopped by {signal.Signals(stopped).name} after step {result.get('steps')}; "
                              f"checkpoint written. Resume with: {resume_command(run.dir)}", stopped)
        return result


class Save(Own):
    name = "save"
    description = "the adapter, in PEFT's format, into adapter/"
    needs = ("model", "method")
    records = ()

    def done(self, ctx) -> bool:
        return saved(ctx)

    def run(self, ctx) -> dict[str, Any]:
        with distributed.whole_state(ctx.model):
            if distributed.current().main:
                ctx.folder.save_adapter(lambda folder: ctx.method.save(ctx.model, folder))
        ctx.summary.adapter_heldout = None  # a new adapter: measured again when a merge or export needs it
        return {"adapter": str(ctx.folder.adapter)}


class Merge(Own):
    name = "merge"
    description = "the adapter merged into its base, saved in merged/ and checked against the adapter ([stages.merge])"
    needs = ("model", "prep", "adapter")
    records = ("merge", "adapter_heldout")
    main_only = True

    def enabled(self, ctx) -> bool:
        return ctx.exp.stages.merge.enabled

    def run(self, ctx) -> dict[str, Any]:
        settings = ctx.exp.stages.merge
        trained_measure(ctx)  # on the trained model in memory, which then leaves it for the 16-bit base
        ctx.model = None
        result = merge(ctx, ctx.folder.merged, settings.dtype, base=settings.base)
        record_merge(ctx, result)
        fidelity.report(result, sys.stderr)
        return result


class Export(Own):
    name = "export"
    description = ("the merged model as GGUF or an Ollama folder in export/, checked against the adapter "
                   "([stages.export])")
    needs = ("prep", "adapter", "merged")
    records = ("exports", "adapter_heldout")
    main_only = True

    def enabled(self, ctx) -> bool:
        return ctx.exp.stages.export.enabled

    def check(self, exp) -> list[str]:
        """The exporter's refusals that don't need a trained model: the architecture, and for Ollama the template."""
        settings = exp.stages.export
        if not settings.enabled:
            return []
        try:
            gguf_file.check_architecture(exp.built.source.config().to_dict())
            if settings.format == "ollama":
                modelfile(exp.built.template, settings.quant, exp.experiment.name)
        except UserError as exc:
            return [f"stages.export: {exc}"]
        return []

    def run(self, ctx) -> dict[str, Any]:
        settings = ctx.exp.stages.export
        trained_measure(ctx)
        ctx.model = None
        result = export(ctx, settings.format, settings.quant)
        record_export(ctx, result)
        if result["check"]["passed"] is False:
            print(f"fx: {report(result)}", file=sys.stderr)
        return result


BUILTIN: tuple[Stage, ...] = (Load(), Evaluate("before"), Benchmark("before"), Generate("before"), Train(), Save(),
                              Evaluate("after"), Benchmark("after"), Generate("after"), Merge(), Export())
