"""The check after every export: the exported GGUF file loaded back (transformers' own GGUF reader, which
dequantises it) against the run's adapter model, as the run's method loads it, on the run's held-out split:
held-out loss, the task metric, greedy answers to the held-out prompts, and the file's tokenizer against the run's.

Tolerances (docs/after-training.md has the measurements): the held-out loss may differ from the adapter's by at most
``TOLERANCE[quant]`` (relative), and at least ``SAME_ANSWERS[quant]`` of the greedy answers must be the adapter's
(f32: every one). Both models are
measured as fx.after.fidelity measures a merged one (the loss on the answer tokens, a preference pair's chosen answer
and an unpaired row's desirable one). The exported model is the adapter merged into the base it was trained against
(on a GPU in 16 bits), so part of any difference is the merge's rounding, which ``fx merge`` records itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fx.after import fidelity, inference
from fx.after.inference import release
from fx.evaluation import held_out_prompts
from fx.run.context import Context

TOLERANCE = {"f32": 0.02, "f16": 0.02, "bf16": 0.04, "q8_0": 0.04, "q5_1": 0.10, "q5_0": 0.10, "q4_1": 0.20,
             "q4_0": 0.20}
# The least share of held-out greedy answers that must equal the adapter's. f32 changes nothing: every answer. f16
# rounds each merged weight to 11 significant bits, which can flip a near-tie between two next tokens: on the
# embedded default 29 of 30 answers stayed the same (the other still a right answer, worded differently), q8_0 28
# of 30 (docs/after-training.md). Lower quantisations are held to their loss alone; their answers are reported.
SAME_ANSWERS = {"f32": 1.0, "f16": 0.9, "bf16": 0.8, "q8_0": 0.8}


def load_gguf(path: Path):
    """The GGUF file as a transformers model in float32 (quantised tensors dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _measure(model, prep, settings) -> tuple[dict[str, Any], list[str]]:
    """Held-out answer loss and the task metric, and the greedy answers (fx.after.fidelity.measure)."""
    result = fidelity.measure(model, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples,
                              settings)
    return {k: v for k, v in result.items() if k != "answers"}, result["answers"]


def _tokenizer_agrees(path: Path, prep) -> dict[str, int]:
    """How many held-out texts the file's tokenizer (as transformers rebuilds it from the GGUF) encodes to the run's
    token ids."""
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [prep.template.render(e.messages).text for e in prep.held_out_examples if e.messages]
    same = sum(exported(t, add_special_tokens=False)["input_ids"] == prep.tokenizer(t, add_special_tokens=False)[
        "input_ids"] for t in texts)
    return {"same": same, "total": len(texts)}


def _divergence(prompts: list[str], want: list[str], got: list[str]) -> dict[str, Any] | None:
    for prompt, a, b in zip(prompts, want, got):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return {"prompt": prompt, "adapter": a, "exported": b, "at_char": at}
    return None


def answers_problem(quant: str, same: int, total: int) -> str | None:
    """What is wrong when ``same`` of ``total`` greedy answers equal the adapter's, under ``quant``'s share."""
    least = SAME_ANSWERS.get(quant)
    if least is None or not total or same / total >= least:
        return None
    return (f"{total - same} of {total} greedy answers differ from the adapter's, over the {1 - least:.0%} allowed "
            f"for {quant}")


def check(ctx: Context, path: Path, quant: str) -> dict[str, Any]:
    """The exported file against the adapter on the run's held-out split (the adapter's measurement is the run's:
    :func:`fx.after.inference.trained_measure`); ``passed`` says whether it is within the tolerance, ``problems``
    what is not."""
    prep = ctx.prep
    tolerance = {"loss_relative": TOLERANCE[quant], "same_answers": SAME_ANSWERS.get(quant)}
    if not prep.held_out.rows:
        return {"passed": None, "tolerance": tolerance, "problems": ["the run has no held-out rows to check on"]}
    settings = ctx.exp.stages.evaluate
    prompts = [conversation[-1]["content"]
               for _, (conversation, _) in held_out_prompts(prep.template, prep.held_out_examples, settings)]
    adapter = inference.trained_measure(ctx)
    exported = load_gguf(path)
    got, got_answers = _measure(exported, prep, settings)
    del exported
    release()
    want, want_answers = {k: v for k, v in adapter.items() if k != "answers"}, adapter["answers"]

    difference = abs(got["loss"] - want["loss"]) / max(want["loss"], 1e-9) if "loss" in want else 0.0
    same = sum(a == b for a, b in zip(want_answers, got_answers))
    tokens = _tokenizer_agrees(path, prep)
    problems = []
    if difference > tolerance["loss_relative"]:
        problems.append(f"held-out loss {got['loss']} against the adapter's {want['loss']}: "
                        f"{difference:.2%} apart, over the {tolerance['loss_relative']:.0%} allowed for {quant}")
    if (problem := answers_problem(quant, same, len(prompts))) is not None:
        problems.append(problem)
    if tokens["same"] < tokens["total"]:
        problems.append(f"the file's tokenizer encodes {tokens['total'] - tokens['same']} of {tokens['total']} "
                        "held-out texts differently from the run's")
    return {
        "passed": not problems, "problems": problems, "tolerance": tolerance, "rows": len(prep.held_out.rows),
        "adapter": want, "exported": got, "loss_difference": round(difference, 5),
        "answers": {"same": same, "total": len(prompts),
                    "first_divergence": _divergence(prompts, want_answers, got_answers)},
        "tokenizer": tokens,
    }
