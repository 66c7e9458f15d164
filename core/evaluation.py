"""Held-out measurements: loss and perplexity on answer tokens, generated answers, and a task metric."""

from __future__ import annotations

import math
import re
from typing import Any

from fx.data.formats import Example, expected
from fx.data.templating import Template, encode_prompt
from fx.data.tokenize import prompt_of


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def heldout_loss(model, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy over the held-out rows' answer tokens (token-weighted), and its perplexity."""
    import torch
    import torch.nn.functional as F

    model.eval()
    dev = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(rows, batch_size):
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(dev)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((shift_labels != -100).sum())
    mean = total / max(count, 1)
    return {"loss": round(mean, 4), "perplexity": round(math.exp(min(mean, 50)), 3)}


def generate(model, tokenizer, template: Template, conversations: list[list[dict]], max_new_tokens: int,
             batch_size: int | None = None, streamer=None) -> list[str]:
    """Greedy answers to the last user turn of each conversation, prompted exactly as training rendered it, in
    batches of ``batch_size`` (default: 8 on a GPU; 32 on a CPU, where a step costs the 4-bit weights'
    dequantisation whatever the batch holds: docs/reliability.md). A ``streamer`` (transformers' TextStreamer)
    receives the tokens as they come; it takes one conversation."""
    import torch

    model.eval()
    dev = next(p.device for p in model.parameters())
    batch_size = batch_size or (8 if dev.type == "cuda" else 32)
    answers = []
    ends = (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None))  # an id or a list
    stop = sorted({x for t in ends if t is not None for x in (t if isinstance(t, list) else [t])})
    end = tokenizer.convert_tokens_to_ids(template.stop)  # the template's end of an answer, when it is one token
    if isinstance(end, int) and tokenizer.convert_ids_to_tokens(end) == template.stop:
        stop.append(end)
    for batch in _batches(conversations, batch_size):
        prompts = [encode_prompt(tokenizer, template.prompt(c)) for c in batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer, synced_gpus=_sharded(model))
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=False).split(template.stop)[0]
            for special in tokenizer.all_special_tokens:
                text = text.replace(special, "")
            answers.append(text.strip())
    return answers


def _sharded(model) -> bool:
    """Whether FSDP shards ``model`` over several ranks: every forward then needs every rank, so generation keeps
    the ranks stepping together until all are done (transformers' ``synced_gpus``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def score(metric: str, answers: list[str], examples: list[Example], references: list[str]) -> dict[str, Any]:
    """``contains``: every string in the row's ``expect`` column (a list of strings, or one string) is in the answer,
    case and whitespace aside; rows without ``expect`` are not scored. ``exact_match``: the answer equals the
    reference, whitespace and case aside."""
    hits = total = 0
    for answer, example, reference in zip(answers, examples, references):
        if metric == "contains":
            expect = expected(example)
            if not expect:
                continue
            ok = all(_normal(e) in _normal(answer) for e in expect)
        else:
            ok = _normal(answer) == _normal(reference)
        hits, total = hits + ok, total + 1
    return {metric: round(hits / total, 4) if total else None, f"{metric}_hits": hits, f"{metric}_total": total}


def held_out_prompts(template, examples: list[Example], settings) -> list[tuple[Example, tuple[list, Any]]]:
    """The first ``settings.max_examples`` held-out examples that have a prompt (``[stages.evaluate]``), each with
    its (conversation, reference answer): what :func:`held_out_answers` answers."""
    return [(e, pair) for e in examples[: settings.max_examples] if (pair := prompt_of(template, e)) is not None]


def held_out_answers(model, tokenizer, template, examples: list[Example], settings):
    """Greedy answers to the held-out prompts (:func:`held_out_prompts`): the examples that have a prompt, their
    answers and their reference answers."""
    scored = held_out_prompts(template, examples, settings)
    answers = generate(model, tokenizer, template, [conversation for _, (conversation, _) in scored],
                       settings.max_new_tokens)
    return [e for e, _ in scored], answers, [reference for _, (_, reference) in scored]


def task_metric(model, tokenizer, template, examples: list[Example], settings) -> tuple[dict[str, Any], list[str]]:
    """The ``[stages.evaluate]`` metric on answers generated to the held-out prompts (none: nothing), and the
    answers."""
    if settings.metric == "none":
        return {}, []
    scored, answers, references = held_out_answers(model, tokenizer, template, examples, settings)
    return score(settings.metric, answers, scored, references), answers


def answer_rows(rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Rows for :func:`heldout_loss`: answer rows as they are; a preference row as its prompt and chosen answer, an
    unpaired row with a desirable answer as its prompt and that answer (undesirable ones left out), the loss on the
    answer (the ``chosen_loss`` of :func:`preference_metrics`, the ``desirable_loss`` of :func:`unpaired_metrics`)."""
    out = []
    for r in rows:
        if "input_ids" in r:
            out.append(r)
        elif "chosen_ids" in r or r.get("label"):
            answer = r["chosen_ids"] if "chosen_ids" in r else r["completion_ids"]
            out.append({"input_ids": r["prompt_ids"] + answer, "labels": [-100] * len(r["prompt_ids"]) + answer})
    return out


def evaluate(model, tokenizer, template, rows, examples: list[Example], settings) -> tuple[dict[str, Any], list[str]]:
    """The held-out loss and, when a metric is set, the task metric on generated answers."""
    result = heldout_loss(model, rows, tokenizer.pad_token_id)
    metric, answers = task_metric(model, tokenizer, template, examples, settings)
    result.update(metric)
    return result, answers


def sequence_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Each (prompt, answer) sequence's summed log-probability of the answer given the prompt, and the answer's token
    count, in order."""
    import torch

    model.eval()
    dev = next(p.device for p in model.parameters())
    sums, counts = [], []
    with torch.no_grad():
        for batch in _batches(sequences, batch_size):
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (prompt, answer) in enumerate(batch):
                n = len(prompt) + len(answer)
                ids[i, :n], mask[i, :n] = torch.tensor(prompt + answer), 1
                labels[i, len(prompt):n] = torch.tensor(answer)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            targets = labels[:, 1:].to(dev)
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums += (logps * (targets != -100)).sum(-1).tolist()
            counts += (targets != -100).sum(-1).tolist()
    return sums, counts


def answer_logps(model, rows: list[dict[str, list[int]]], pad_id: int):
    """Each preference row's summed log-probability of its chosen and of its rejected answer given the prompt, and
    the answers' token counts: four lists, in row order."""
    sums, counts = sequence_logps(model, [(r["prompt_ids"], r[f"{side}_ids"]) for side in ("chosen", "rejected")
                                          for r in rows], pad_id)
    n = len(rows)
    return sums[:n], sums[n:], counts[:n], counts[n:]


def preference_metrics(model, rows: list[dict[str, list[int]]], pad_id: int, beta: float,
                       reference=None) -> dict[str, Any]:
    """Held-out preference measurements of a policy, and against its reference when it has one (``reference()``: a
    context manager in which ``model`` computes as the reference does).

    ``logp_accuracy``: the share of pairs where the policy itself gives the chosen answer the higher summed
    log-probability; ``logp_accuracy_per_token`` compares mean log-probabilities per answer token instead (answers of
    different lengths); ``logp_margin``: the mean summed difference. ``chosen_loss``: mean cross-entropy per chosen
    token. With a reference, ``reward_accuracy``: the share of pairs whose implicit reward margin
    beta * [(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))] is above 0 (DPO's
    ``rewards/accuracies``; exactly 0 while the policy is its reference), ``reward_margin`` its mean.
    """
    chosen, rejected, n_chosen, n_rejected = answer_logps(model, rows, pad_id)
    pairs = len(rows)
    result: dict[str, Any] = {}
    if reference is not None:
        with reference():
            ref_chosen, ref_rejected, _, _ = answer_logps(model, rows, pad_id)
        margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        result.update(reward_accuracy=round(sum(m > 0 for m in margins) / pairs, 4),
                      reward_margin=round(sum(margins) / pairs, 4))
    return {
        **result,
        "logp_accuracy": round(sum(c > r for c, r in zip(chosen, rejected)) / pairs, 4),
        "logp_accuracy_per_token": round(sum(c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in
                                             zip(chosen, rejected, n_chosen, n_rejected)) / pairs, 4),
        "logp_margin": round(sum(c - r for c, r in zip(chosen, rejected)) / pairs, 4),
        "chosen_loss": round(-sum(chosen) / max(sum(n_chosen), 1), 4),
        "pairs": pairs,
    }


def unpaired_metrics(model, rows: list[dict[str, Any]], pad_id: int, beta: float, reference=None) -> dict[str, Any]:
    """Held-out measurements of a policy trained on unpaired rows (prompt, completion, label), and against its
    reference when it has one (``reference()`` as in :func:`preference_metrics`).

    ``label_accuracy``: the share of rows whose implicit reward beta * (log p(answer) - log p_ref(answer)) has the
    sign of its label (above 0 for a desirable answer, below for an undesirable one; exactly 0 while the policy is its
    reference); ``reward_desirable`` and ``reward_undesirable``: the rewards' means by label (these three need the
    reference). ``desirable_loss``:
    cross-entropy per token of the desirable answers. Where a prompt has both kinds of answer, ``logp_accuracy`` is the
    share of its (desirable, undesirable) combinations in which the policy finds the desirable one more likely
    (``logp_accuracy_per_token``: per answer token), over ``pairs`` such combinations.
    """
    sequences = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    logps, counts = sequence_logps(model, sequences, pad_id)
    labels = [bool(r["label"]) for r in rows]
    good = [i for i, label in enumerate(labels) if label]
    bad = [i for i, label in enumerate(labels) if not label]

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    result: dict[str, Any] = {
        "desirable_loss": round(-sum(logps[i] for i in good) / max(sum(counts[i] for i in good), 1), 4),
        "rows": len(rows),
    }
    if reference is not None:
        with reference():
            ref_logps, _ = sequence_logps(model, sequences, pad_id)
        rewards = [beta * (p - q) for p, q in zip(logps, ref_logps)]
        result.update(label_accuracy=mean([(w > 0) if label else (w < 0) for w, label in zip(rewards, labels)]),
                      reward_desirable=mean([rewards[i] for i in good]),
                      reward_undesirable=mean([rewards[i] for i in bad]))
    by_prompt: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
    for i, r in enumerate(rows):
        by_prompt.setdefault(tuple(r["prompt_ids"]), ([], []))[0 if labels[i] else 1].append(i)
    combos = [(g, b) for goods, bads in by_prompt.values() for g in goods for b in bads]
    if combos:
        result.update(
            logp_accuracy=mean([logps[g] > logps[b] for g, b in combos]),
            logp_accuracy_per_token=mean([logps[g] / max(counts[g], 1) > logps[b] / max(counts[b], 1)
                                          for g, b in combos]),
            pairs=len(combos))
    return result
