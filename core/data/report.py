"""``fx data``: what the model will be trained on, before a run spends time on it.

A few training examples rendered through the experiment's template with the loss-bearing text marked, the
token-length distribution under that template and tokenizer, how many rows the method's tokenization truncates
and drops (its own limits included: a preference or unpaired method's prompt and answer lengths), and a histogram
of the lengths as a PNG.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from fx.config import Experiment
from fx.data.prepare import check_kind, load_examples, refuse
from fx.data.templating import Rendered
from fx.data.tokenize import render
from fx.errors import UserError, printable
from fx.files import write_atomic

OPEN, CLOSE = "⟦", "⟧"  # around loss-bearing text in the printed examples


@dataclass
class LengthStats:
    rows: int
    min: int
    median: float
    p95: int
    max: int
    truncated: int  # rows the method's tokenization cuts
    unanswered: int  # rows it drops: no answer token left

    @classmethod
    def of(cls, lengths: list[int], truncated: int, unanswered: int) -> LengthStats:
        ordered = sorted(lengths)
        p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]  # nearest rank
        return cls(len(ordered), ordered[0], statistics.median(ordered), p95, ordered[-1], truncated, unanswered)


def length_histogram(lengths: list[int], max_length: int, path: Path, title: str) -> Path:
    """Write a histogram of token lengths with ``max_length`` marked; written beside, then renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.subplots()
    ax.hist(lengths, bins=min(40, max(lengths) - min(lengths) + 1), color="#4c72b0", edgecolor="white", linewidth=0.3)
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    over = sum(n > max_length for n in lengths)
    ax.set(title=title, xlabel="tokens per row (before truncation)", ylabel="rows")
    ax.legend(title=f"{over} of {len(lengths)} truncated", loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def segments(rendered: Rendered, tokenizer, max_length: int) -> tuple[list[tuple[str, bool]], bool]:
    """The rendered text as training sees it, cut where truncation cuts it, as (text, carries loss) pieces;
    and whether it was cut."""
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = offsets[max_length][0] if len(offsets) > max_length else len(rendered.text)
    pieces, position = [], 0
    for start, end in rendered.spans:
        if start >= cut:
            break
        pieces += [(rendered.text[position:start], False), (rendered.text[start:min(end, cut)], True)]
        position = min(end, cut)
    pieces.append((rendered.text[position:cut], False))
    return [(text, loss) for text, loss in pieces if text], cut < len(rendered.text)


@dataclass
class Report:
    stats: LengthStats
    examples: list[tuple[str, list[tuple[str, bool]], bool]]  # (label, pieces, truncated)
    histogram: Path
    train_rows: int
    held_out_rows: int
    kind: str  # Example.kind of the rows


def answer_pieces(method, example, template, tokenizer, max_length: int):
    """A preference or unpaired row as the method trains on it (its own prompt and answer limits applied): for each
    answer (chosen and rejected; an unpaired row's one), its name, the prompt and the answer as (text, carries loss)
    pieces, and whether the row was cut; [] when it is dropped."""
    tokenized = method.tokenize([example], template, tokenizer, max_length)
    if not tokenized.rows:
        return []
    row, cut = tokenized.rows[0], bool(tokenized.truncated)
    if example.is_unpaired:
        answers = [("desirable" if row["label"] else "undesirable", "completion_ids")]
    else:
        answers = [("chosen", "chosen_ids"), ("rejected", "rejected_ids")]
    return [(which, [(tokenizer.decode(row["prompt_ids"]), False), (tokenizer.decode(row[key]), True)], cut)
            for which, key in answers]


def build(exp: Experiment, count: int, png: Path | None) -> Report:
    """Tokenize every row as the run's method does, and render the first ``count`` training rows."""
    path = png or Path(exp.experiment.output_dir) / f"{exp.experiment.name}-lengths.png"
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give --png the name of the PNG file to write")
    train, held = load_examples(exp)
    check_kind(exp, train + held)
    method, source = exp.built.method, exp.built.source
    refuse(exp, source.check())
    tokenizer, template = exp.built.tokenizer, exp.built.template
    max_length = exp.data.max_length
    shown = []
    try:
        parts = [method.tokenize(part, template, tokenizer, max_length) for part in (train, held) if part]
        for index, example in enumerate(train[:count]):
            label = f"train example {index + 1}"
            if example.is_preference or example.is_unpaired:
                shown += [(f"{label} ({which})", pieces, cut)
                          for which, pieces, cut in answer_pieces(method, example, template, tokenizer, max_length)]
            else:
                shown.append((label, *segments(render(template, example), tokenizer, max_length)))
    except ValueError as exc:
        raise UserError(f"template {exp.template.name!r}: {exc}") from None
    lengths = [n for part in parts for n in part.lengths]
    stats = LengthStats.of(lengths, sum(p.truncated for p in parts), sum(p.dropped for p in parts))
    title = f"{exp.experiment.name}: template {exp.template.name!r}"
    try:
        histogram = length_histogram(lengths, max_length, path, title)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the length histogram: {exc.strerror or exc}") from None
    return Report(stats, shown, histogram, len(train), len(held),
                  train[0].kind)


def show(exp: Experiment, report: Report, console) -> None:
    from rich.rule import Rule
    from rich.text import Text

    s = report.stats
    kind = {"pairs": "preference pairs (each rendered with its chosen and its rejected answer, cut as the method "
                     "cuts them)",
            "unpaired": "unpaired rows (each a prompt with one answer, desirable or not, cut as the method cuts "
                        "them)"}.get(report.kind, "rows")
    console.print(f"{exp.path}: {report.train_rows} training and {report.held_out_rows} held-out {kind}; "
                  f"template {exp.template.name!r}, model {exp.model.name!r}")
    if report.examples:
        console.print(f"Loss-bearing text is marked {OPEN}like this{CLOSE}.")
    for label, pieces, cut in report.examples:
        console.print(Rule(label + (f" — truncated at data.max_length = {exp.data.max_length}" if cut else "")))
        out = Text()
        for text, loss in pieces:
            text = printable(text)  # a dataset's escape sequences are shown, never sent to the terminal
            out.append(f"{OPEN}{text}{CLOSE}" if loss else text, style="bold green" if loss else None)
        console.print(out, highlight=False, markup=False)
    console.print(Rule("token lengths"))
    rows = {"pairs": "pairs (prompt + the longer answer)", "unpaired": "unpaired rows (prompt + answer)"}.get(
        report.kind, "rendered rows")
    console.print(f"{s.rows} {rows}: min {s.min}, median {s.median:g}, p95 {s.p95}, max {s.max} tokens")
    limits = f"data.max_length = {exp.data.max_length}"
    for key in ("max_prompt_length", "max_completion_length"):  # a preference or unpaired method's own limits
        if getattr(exp.method.settings, key, None):
            limits += f", method.{key} = {getattr(exp.method.settings, key)}"
    console.print(f"truncated at {limits}: {s.truncated} of {s.rows} rows"
                  + (f"; {s.unanswered} keep no answer token and would be dropped" if s.unanswered else ""))
    console.print(f"histogram: {report.histogram}")
