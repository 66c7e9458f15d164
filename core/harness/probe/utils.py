"""fx's general-ability probe for lm-evaluation-harness: its data (the .jsonl files beside this one, written by
scripts/make_probe.py) and the score of a generated answer. Usable without fx: ``lm_eval --include_path DIR``."""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str, **_):
    import datasets

    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs):
    return _load("multiple_choice", **kwargs)


def generated(**kwargs):
    return _load("generated", **kwargs)


def _words(text: str, case: bool) -> str:
    text = re.sub(r"[^\w\s.,]", " ", text if case else text.lower())
    return " ".join(text.replace(",", " ").split()).strip(" .")


def score(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the answer is one of the accepted ones, or starts with one followed by the end of a word (``Paris.``,
    ``27 is the answer``); case counts only where the item says so (``case``)."""
    case = bool(doc.get("case"))
    answer = _words(results[0], case)
    for accepted in doc["answers"]:
        want = _words(accepted, case)
        if answer == want or answer.startswith(want + " "):
            return {"acc": 1.0}
    return {"acc": 0.0}
