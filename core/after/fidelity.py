"""Does a merged model behave like the run it came from? The same held-out measurements of the adapter model and of
the merged one (answer loss, the task metric, the greedy answers), their gaps, and a tolerance per dtype beyond
which the gap is a loud warning.

The measurements are method-independent, so that a plain merged model (no adapter to switch off, no reference) is
measured as the adapter model is: the loss on the answer tokens (a preference pair's chosen answer, an unpaired row's
desirable one), the greedy answers to the first ``[stages.evaluate] max_examples`` held-out prompts, scored with
``[stages.evaluate] metric``, and for preference data what the preference training taught, measured without a
reference: ``logp_accuracy``, the share of held-out pairs (of an unpaired prompt's desirable and undesirable answers)
whose preferred answer the model finds the more likely, held to the metric's tolerance.
"""

from __future__ import annotations

import sys
from typing import Any

from fx.evaluation import answer_rows, held_out_answers, heldout_loss, preference_metrics, score, unpaired_metrics

# How far a merged model may be from its adapter model, per dtype of the merged weights: the relative gap in
# held-out answer loss, the absolute gap in the task metric (a share of rows), and the least share of greedy answers
# that must be identical. float32 merges exactly (the adapter added into the same weights; only the order of the
# additions differs): identical answers. 16-bit weights round the merged sum (float16 to 11 significant bits,
# bfloat16 to 8), which moves logits and so some greedy answers; the bounds are a few times the gaps measured on
# the embedded default (docs/after-training.md).
TOLERANCE: dict[str, dict[str, float]] = {
    "float32": {"loss": 0.002, "metric": 0.0, "same_answers": 1.0},
    "float16": {"loss": 0.01, "metric": 0.1, "same_answers": 0.5},
    "bfloat16": {"loss": 0.03, "metric": 0.15, "same_answers": 0.3},
}


def measure(model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
    """``model``'s held-out answer loss and perplexity, ``logp_accuracy`` on preference data, its greedy ``answers``
    and, with a metric, the metric."""
    answered = answer_rows(rows)
    result: dict[str, Any] = heldout_loss(model, answered, tokenizer.pad_token_id) if answered else {}
    result.update(own_preference(model, rows, tokenizer.pad_token_id))
    scored, answers, references = held_out_answers(model, tokenizer, template, examples, settings)
    if settings.metric != "none":
        result.update(score(settings.metric, answers, scored, references))
    result["answers"] = answers
    return result


def own_preference(model, rows, pad_id: int) -> dict[str, Any]:
    """For preference pairs and unpaired rows, ``logp_accuracy`` (fx.evaluation, no reference); else nothing."""
    if rows and "chosen_ids" in rows[0]:
        measured = preference_metrics(model, rows, pad_id, beta=1.0)  # beta scales rewards, which need a reference
    elif rows and "completion_ids" in rows[0]:
        measured = unpaired_metrics(model, rows, pad_id, beta=1.0)
    else:
        return {}
    return {"logp_accuracy": measured["logp_accuracy"]} if "logp_accuracy" in measured else {}


def compare(adapter: dict[str, Any], merged: dict[str, Any], dtype: str, metric: str) -> dict[str, Any]:
    """The gaps between the two measurements, the tolerance they are held to, and the verdict."""
    tolerance = TOLERANCE[dtype]
    pairs = list(zip(adapter["answers"], merged["answers"]))
    same = sum(a == b for a, b in pairs)
    out: dict[str, Any] = {"adapter": {k: v for k, v in adapter.items() if k != "answers"},
                           "merged": {k: v for k, v in merged.items() if k != "answers"},
                           "same_answers": same, "answers": len(pairs), "tolerance": tolerance}
    failures = []
    if "loss" in adapter and "loss" in merged:
        out["loss_gap"] = round(merged["loss"] - adapter["loss"], 5)
        if abs(out["loss_gap"]) > tolerance["loss"] * max(adapter["loss"], 1e-9):
            failures.append("loss")
    if metric != "none" and adapter.get(metric) is not None and merged.get(metric) is not None:
        out["metric_gap"] = round(merged[metric] - adapter[metric], 4)
        if abs(out["metric_gap"]) > tolerance["metric"] + 1e-9:
            failures.append(metric)
    if "logp_accuracy" in adapter and "logp_accuracy" in merged:
        out["logp_accuracy_gap"] = round(merged["logp_accuracy"] - adapter["logp_accuracy"], 4)
        if abs(out["logp_accuracy_gap"]) > tolerance["metric"] + 1e-9:
            failures.append("logp_accuracy")
    if pairs and same / len(pairs) < tolerance["same_answers"]:
        failures.append("answers")
    out["differing"] = [{"adapter": a, "merged": b} for a, b in pairs if a != b][:3]  # a few, to read
    out["within_tolerance"] = not failures
    out["beyond_tolerance"] = failures
    return out


def lines(merged: dict[str, Any]) -> list[str]:
    """``merged`` (what :func:`fx.after.merge.merge` returned) as lines for a person: what was merged, and how the
    merged model compares with the adapter."""
    out = [f"merged ({merged['dtype']}, base {merged['base']}, {merged['size_gib']} GiB in {merged['wall_s']} s): "
           f"{merged['path']}"]
    check = merged.get("check")
    if not isinstance(check, dict):
        return out + [f"not checked: {check}"]
    a, m = check["adapter"], check["merged"]
    parts = []
    if "loss_gap" in check:
        parts.append(f"held-out loss {a['loss']:.4f} -> {m['loss']:.4f} ({check['loss_gap']:+.4f})")
    if "logp_accuracy_gap" in check:
        parts.append(f"preferred answer the more likely {a['logp_accuracy']:.2%} -> {m['logp_accuracy']:.2%}")
    for key in a:
        if key.endswith("_hits"):
            name = key[: -len("_hits")]
            parts.append(f"{name} {a[key]}/{a[name + '_total']} -> {m[key]}/{m[name + '_total']}")
    parts.append(f"identical greedy answers {check['same_answers']}/{check['answers']}")
    out.append("adapter -> merged: " + ", ".join(parts))
    if not check["within_tolerance"]:
        t = check["tolerance"]
        out.append(f"WARNING: the merged model does not behave like the trained adapter "
                   f"({', '.join(check['beyond_tolerance'])} beyond the {merged['dtype']} tolerance: loss within "
                   f"{t['loss']:.1%}, metric within {t['metric']:g}, at least {t['same_answers']:.0%} identical "
                   "answers)" + (": the original weights are not what the adapter was trained against; "
                                 "--base trained merges into those" if merged["base"] == "original" else ""))
        for d in check["differing"]:
            out.append(f"  adapter: {d['adapter'][:100]!r}\n  merged:  {d['merged'][:100]!r}")
    return out


def report(merged: dict[str, Any], stream=None) -> None:
    """Print :func:`lines` to ``stream`` (default stdout); a gap beyond tolerance goes to stderr, in bold red on a
    terminal."""
    loud = sys.stderr.isatty()
    for line in lines(merged):
        if line.startswith(("WARNING", "  adapter: ")):
            print(f"\033[1;31mfx: {line}\033[0m" if loud else f"fx: {line}", file=sys.stderr)
        else:
            print(line, file=stream or sys.stdout)
