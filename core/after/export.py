"""``fx export``: a finished run's model where people run models. ``gguf``: one GGUF file for llama.cpp (and
anything built on it); ``ollama``: a folder with that file and a Modelfile whose template, system prompt and stop
parameter come from the run's template, for ``ollama create``. The input is the model that was trained: the adapter
merged into the base it was trained against (fx.after.merge, ``base = "trained"``), ``fx merge``'s folder when the
run has one merged so, else a merge made for the export and removed after it; after writing, the export is checked
against the adapter (fx.after.export_check) and the check recorded in the run's ``summary.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fx.after import export_check, gguf_file, inference
from fx.after.merge import merge
from fx.errors import UserError
from fx.files import atomic_folder, naming, write_atomic
from fx.run.context import Context
from fx.run.directory import RunDir

FORMATS = ("gguf", "ollama")
MODEL_FILE = "model.gguf"  # the GGUF inside an Ollama folder


def default_out(run_dir: Path, fmt: str, quant: str) -> Path:
    name = RunDir(run_dir).path.resolve().name
    return Path(run_dir) / "export" / (f"{name}-{quant}.gguf" if fmt == "gguf" else f"ollama-{quant}")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f"the {what} holds '\"\"\"', which a Modelfile cannot quote")
    return f'"""{text}"""'


def modelfile(template, quant: str, run_name: str) -> str:
    """The Modelfile of an Ollama folder: the run's template as Ollama's Go template, its system prompt, and the
    text that ends an answer as the stop parameter."""
    go = template.ollama_template()
    stop = template.stop
    if '"' in stop or "\n" in stop:
        raise UserError(f"the template's end of answer {stop!r} cannot be written as a Modelfile stop parameter")
    lines = [f"# {run_name}, exported by fx ({quant}): ollama create NAME -f Modelfile", f"FROM ./{MODEL_FILE}",
             f"TEMPLATE {_quoted(go, 'template')}"]
    if template.settings.system_prompt is not None:
        lines.append(f"SYSTEM {_quoted(template.settings.system_prompt, 'system prompt')}")
    lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def _merged(ctx: Context, work: Path) -> tuple[Path, dict[str, Any]]:
    """The run's merged folder when it holds the adapter merged into its trained base; otherwise the model merged
    so into ``work`` for this export (not checked on its own: the export's check measures what comes of it)."""
    files = ctx.folder
    record = inference.merge_record(files.merged) if (files.merged / "config.json").is_file() else None
    damaged = inference.merged_problems(files.merged) if record is not None else []
    if record is not None and record.get("base") == "trained" and not damaged:
        ctx.model = None  # the trained model in memory is not needed again: its measurement is in the record
        return files.merged, {"path": str(files.merged), "reused": True, "base": "trained"}
    result = merge(ctx, work / "merged", "auto", base="trained", check=False)
    why = (f"{files.merged} is damaged: {'; '.join(damaged[:2])}" if damaged else
           f"{files.merged} is merged into the {record.get('base', 'original')} weights, not the trained base"
           if record is not None else None)
    return work / "merged", {**result, "reused": False, "path": None,  # removed after the export
                             **({"not_reused": why} if why else {})}


def export(ctx: Context, fmt: str, quant: str, out: Path | None = None) -> dict[str, Any]:
    """Write the run's model as ``fmt`` at ``out`` (default: ``RUN/export/...``), then check it against the adapter
    (whose measurement is the run's, taken before anything is merged: fx.after.inference.trained_measure). Every
    refusal comes before anything is merged or written; what is written appears whole or not at all."""
    run_dir = ctx.folder.path
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    gguf_file.check_quant(quant)
    inference.adapter_dir(run_dir)  # an unfinished run is refused here
    gguf_file.check_architecture(ctx.source.config().to_dict())
    template = ctx.template
    chat_template = template.chat_template()
    described = modelfile(template, quant, run_dir.resolve().name) if fmt == "ollama" else None
    out = Path(out) if out is not None else default_out(run_dir, fmt, quant)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF file's name ends in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)

    with naming(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=".fx-export-") as work:
        inference.trained_measure(ctx)  # before the merge: the trained model in memory, if any, is measured and freed
        merged, merge_result = _merged(ctx, Path(work))
        if fmt == "gguf":
            written = gguf_file.write(merged, out, quant, run_dir.resolve().name, chat_template)
            model_path = out
        else:
            with atomic_folder(out) as folder:
                written = gguf_file.write(merged, folder / MODEL_FILE, quant, run_dir.resolve().name, chat_template)
                write_atomic(folder / "Modelfile", described)
            model_path = out / MODEL_FILE
            written["path"] = str(model_path)
    result: dict[str, Any] = {"format": fmt, "out": str(out), **written, "merge": merge_result}
    result["check"] = export_check.check(ctx, model_path, quant)
    return result


def record(ctx: Context, result: dict[str, Any]) -> None:
    """The export and its check in the run's record (``exports``, one entry per output path)."""
    summary = ctx.summary
    summary.exports = [e for e in summary.exports if e.get("out") != result["out"]] + [result]
    ctx.record.write()


def report(result: dict[str, Any]) -> str:
    """One paragraph on the check, for the terminal; a failed check says so first, in capitals."""
    check = result["check"]
    if check["passed"] is None:
        return f"check: not run ({'; '.join(check['problems'])})"
    head = "check passed" if check["passed"] else "CHECK FAILED: the export does not behave like the adapter"
    lines = [f"{head} (held-out loss {check['exported'].get('loss')} vs adapter {check['adapter'].get('loss')}, "
             f"{check['loss_difference']:.2%} apart, tolerance {check['tolerance']['loss_relative']:.0%}; "
             f"greedy answers {check['answers']['same']}/{check['answers']['total']} the same)"]
    lines += [f"  - {p}" for p in check["problems"]]
    if check["answers"]["first_divergence"]:
        d = check["answers"]["first_divergence"]
        lines.append(f"  first divergence, {d['prompt']!r}: adapter {d['adapter']!r} / exported {d['exported']!r}")
    return "\n".join(lines)
