"""General ability through EleutherAI's lm-evaluation-harness (the ``fx[eval]`` extra): harness tasks run on a model
in memory, prompted in the run's template where the task is chat-style, and their scores with standard errors.

fx ships its own task, ``fx_probe`` (``probe/``: short factual, arithmetic, reading and instruction-following items,
multiple-choice and generated-answer), which needs no download; the harness's own tasks (arc_easy, hellaswag, mmlu
subsets, gsm8k, ifeval, ...) need their datasets from the Hugging Face hub or its cache. docs/evaluation.md.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fx.errors import UserError

PROBE = Path(__file__).resolve().parent / "probe"
DEFAULT_TASKS = ("fx_probe",)
# a task's headline metric: the first of these it reports
METRICS = ("acc_norm", "acc", "exact_match", "prompt_level_strict_acc", "f1", "bleu")
INSTALL = "the benchmark needs lm-evaluation-harness: pip install 'fx[eval]' (or pip install lm-eval)"


def require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


def own(task: str) -> bool:
    return task.startswith("fx_probe")


def chat_style(task: str, chat: bool | None) -> bool:
    """Whether ``task`` is prompted in the run's template: fx's probe (written as questions to an assistant) unless
    ``chat`` says otherwise; the harness's tasks (mostly completions and few-shot prompts) when ``chat`` is true."""
    if chat is not None:
        return chat
    return task.startswith("fx_probe")


def task_manager(tasks: list[str] | None = None):
    """The harness's index of tasks with fx's probe in it; the harness's own ~15,000 (seconds to index) only when
    ``tasks`` names one that isn't fx's."""
    require()
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):  # the harness logs every task it indexes and every request it builds
        logging.getLogger(name).setLevel(logging.ERROR)
    defaults = tasks is None or not all(own(t) for t in tasks)
    return TaskManager(include_path=str(PROBE), include_defaults=defaults, verbosity="ERROR")


def unknown(tasks: list[str], manager=None) -> list[str]:
    """The names in ``tasks`` the harness knows no task or group by, each with a close match where there is one."""
    import difflib

    manager = manager or task_manager(tasks)
    known = set(manager.all_tasks)
    out = []
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            out.append(f"unknown task {task!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


def _lm(model, tokenizer, template, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    class InTemplate(HFLM):
        """The harness's transformers model, its chat turns rendered by fx's template (as training rendered them)."""

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return template.prompt([dict(m) for m in chat_history])

        def chat_template(self, chat_template=False) -> str:
            return f"fx template {template.name}"

    lm = InTemplate(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False,
                    max_length=getattr(model.config, "max_position_embeddings", None) or 2048)
    return lm


@contextmanager
def quiet_bars():
    """The harness's progress bars off while it runs (it passes ``disable=`` itself, so tqdm's own switches don't
    reach them); fx's console says where the run stands."""
    import importlib

    from tqdm import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    swapped = []
    for name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is tqdm:
            swapped.append(module)
            module.tqdm = Quiet
    try:
        yield
    finally:
        for module in swapped:
            module.tqdm = tqdm


def headline(scores: dict[str, Any]) -> tuple[str, float, float | None] | None:
    """``(metric, value, stderr)`` of a task's results as the harness reports them (``"acc,none": 0.7``)."""
    for metric in METRICS:
        for key, value in scores.items():
            if key.split(",")[0] == metric and isinstance(value, (int, float)):
                err = scores.get(key.replace(metric, f"{metric}_stderr", 1))
                return metric, float(value), float(err) if isinstance(err, (int, float)) and math.isfinite(err) \
                    else None
    return None


def evaluate(model, tokenizer, template, tasks: list[str], limit: float | None = None, chat: bool | None = None,
             batch_size: int = 16, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each task's (or group's) headline score: ``{task: {metric, score, stderr, n}}``, in the order of ``tasks``.
    ``limit``: items per task (a fraction when below 1), the harness's subsampling; the standard error says what it
    costs."""
    require()
    from lm_eval import evaluator

    manager = task_manager(tasks)
    problems = unknown(tasks, manager)
    if problems:
        raise UserError("tasks: " + "; ".join(problems))
    lm = _lm(model, tokenizer, template, batch_size)
    out: dict[str, dict[str, Any]] = {}
    for in_chat in (True, False):
        names = [t for t in tasks if chat_style(t, chat) == in_chat]
        if not names:
            continue
        try:
            with quiet_bars():
                results = evaluator.simple_evaluate(
                    model=lm, tasks=names, limit=limit, apply_chat_template=in_chat, fewshot_as_multiturn=in_chat,
                    task_manager=manager, log_samples=False, bootstrap_iters=1000, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")
        except ConnectionError as exc:  # a hub task's dataset that is neither cached nor reachable
            raise UserError(f"the harness could not load {', '.join(names)}: {exc} (fx's own task, fx_probe, "
                            "needs no download)") from None
        counts = results.get("n-samples", {})
        for name in names:
            scores = results.get("groups", {}).get(name) or results["results"].get(name, {})
            found = headline(scores)
            if found is None:
                continue
            metric, value, err = found
            n = counts.get(name, {}).get("effective")
            if n is None:  # a group: its tasks' items
                n = sum(c.get("effective", 0) for t, c in counts.items() if t in results.get("group_subtasks",
                                                                                                {}).get(name, []))
            out[name] = {"metric": metric, "score": round(value, 4),
                         "stderr": round(err, 4) if err is not None else None, "n": int(n) if n else None}
    return {t: out[t] for t in tasks if t in out}


def general(scores: dict[str, dict[str, Any]]) -> float | None:
    """The general score: the mean of the tasks' headline scores."""
    values = [s["score"] for s in scores.values()]
    return round(sum(values) / len(values), 4) if values else None


def line(before: float | None, after: float | None) -> str:
    """``0.71 -> 0.52 (-27%)``."""
    if before is None or after is None:
        return f"{before if before is not None else after:.3f}" if (before or after) is not None else "-"
    change = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{before:.3f} -> {after:.3f}{change}"
