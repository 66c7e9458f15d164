"""The check after every export: the exported GGUF file loaded back (transformers' own GGUF reader, which
dequantises it) against the run's adapter model, as the run's method loads it, on the run's held-out split:
held-out loss, the task metric, greedy answers to the held-out prompts, and the file's tokenizer against the run's.

Tolerances (docs/after-training.md has the measurements): the held-out loss may differ from the adapter's by at most
``TOLERANCE[quant]`` (relative), and for f32 and f16 every greedy answer must be the adapter's. The merged model is
the adapter folded into 16-bit weights, so part of any difference is the merge's, which the merge records itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fx.after import inference
from fx.after.merge import release
from fx.config import Experiment
from fx.data.prepare import prepare
from fx.data.tokenize import prompt_of
from fx.evaluation import generate, heldout_loss, score

TOLERANCE = {"f32": 0.02, "f16": 0.02, "bf16": 0.04, "q8_0": 0.04, "q5_1": 0.10, "q5_0": 0.10, "q4_1": 0.20,
             "q4_0": 0.20}
SAME_ANSWERS = ("f32", "f16")


def load_gguf(path: Path):
    """The GGUF file as a transformers model in float32 (quantised tensors dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _measure(model, prep, scored, settings) -> tuple[dict[str, Any], list[str]]:
    """Held-out loss, greedy answers to the (conversation, reference, example) triples, and the task metric."""
    rows = prep.held_out.rows
    result = heldout_loss(model, rows, prep.tokenizer.pad_token_id) if "labels" in rows[0] else {}  # not pairs
    answers = generate(model, prep.tokenizer, prep.template, [c for c, _, _ in scored], settings.max_new_tokens)
    if settings.metric != "none":
        result.update(score(settings.metric, answers, [e for _, _, e in scored], [r for _, r, _ in scored]))
    return result, answers


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


def check(exp: Experiment, run_dir: Path, path: Path, quant: str) -> dict[str, Any]:
    """The exported file against the adapter on the held-out split; ``passed`` says whether it is within the
    tolerance, ``problems`` what is not."""
    prep = prepare(exp)
    tolerance = {"loss_relative": TOLERANCE[quant], "same_answers": quant in SAME_ANSWERS}
    if not prep.held_out.rows:
        return {"passed": None, "tolerance": tolerance, "problems": ["the run has no held-out rows to check on"]}
    settings = exp.stages.evaluate
    scored = [(*pair, e) for e in prep.held_out_examples[: settings.max_examples]
              if (pair := prompt_of(prep.template, e)) is not None]
    exported = load_gguf(path)
    got, got_answers = _measure(exported, prep, scored, settings)
    del exported
    release()
    adapter = inference.load_model(exp, prep.source, run_dir)
    want, want_answers = _measure(adapter, prep, scored, settings)
    del adapter
    release()

    difference = abs(got["loss"] - want["loss"]) / max(want["loss"], 1e-9) if "loss" in want else 0.0
    prompts = [c[-1]["content"] for c, _, _ in scored]
    same = sum(a == b for a, b in zip(want_answers, got_answers))
    tokens = _tokenizer_agrees(path, prep)
    problems = []
    if difference > tolerance["loss_relative"]:
        problems.append(f"held-out loss {got['loss']} against the adapter's {want['loss']}: "
                        f"{difference:.2%} apart, over the {tolerance['loss_relative']:.0%} allowed for {quant}")
    if tolerance["same_answers"] and same < len(prompts):
        problems.append(f"{len(prompts) - same} of {len(prompts)} greedy answers differ from the adapter's")
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
