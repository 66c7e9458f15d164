"""Merging a run's adapter into its base, and checking that the merged model is the model that was trained.

By default (``base = "trained"``) the adapter goes into the base it was trained against, as the run's method
gives it (:meth:`fx.Method.merge_base`: for QLoRA the 4-bit NF4 weights dequantised by bitsandbytes), so the merged
model computes what the adapter model computes. ``base = "original"`` merges into the model source's own weights, as
the QLoRA tutorial does; that model differs from the trained one by the quantisation error, which the check shows.
Either way the result is a standard transformers folder (safetensors, the tokenizer, and a chat template that
prompts it the way it was trained) that loads with no fx installed, and right after it is written the merged model
is measured against the adapter on the run's held-out rows (fx.after.fidelity).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fx.after import fidelity, inference
from fx.after.inference import release
from fx.errors import UserError
from fx.files import atomic_folder
from fx.run.context import Context
from fx.training.devices import compute_dtype, dtype_name

BASES = ("trained", "original")


def folder_size_gib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30, 3)


def merge(ctx: Context, out: Path, dtype: str = "auto", *, base: str = "trained", check: bool = True
          ) -> dict[str, Any]:
    """Merge the run's adapter into its ``base`` (``trained``: what the adapter was trained against; ``original``:
    the model source's weights) in ``dtype`` (``auto``: bf16/fp16 on a GPU, float32 on CPU), write the model into
    ``out`` (written beside, then renamed into place), and unless ``check`` is False measure it against the adapter
    on the held-out rows. The adapter's own measurement is the run's (:func:`fx.after.inference.trained_measure`:
    the record's, else the trained model in memory, else the saved adapter loaded and measured once).

    Returns ``path``, ``dtype``, ``base``, ``size_gib``, ``wall_s`` (loading and merging), ``chat_template``, and
    ``check``: :func:`fx.after.fidelity.compare`'s result, or a string saying why nothing was compared."""
    import torch
    from peft import PeftModel

    if base not in BASES:
        raise UserError(f"merge base {base!r}: one of {', '.join(BASES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; remove it or choose another --out")
    adapter_dir = inference.adapter_dir(ctx.folder.path)
    chosen = compute_dtype(dtype)
    settings = ctx.exp.stages.evaluate
    adapter = inference.trained_measure(ctx) if check else None
    ctx.model = None  # the trained (4-bit) model leaves memory before the base comes in
    release()
    result: dict[str, Any] = {"dtype": dtype_name(chosen), "base": base}
    if torch.cuda.is_available():  # what the previous (4-bit) model still holds when the base comes in
        result["vram_allocated_before_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    started = time.perf_counter()
    loaded = (ctx.method.merge_base(ctx.source, chosen) if base == "trained"
              else ctx.source.load(dtype=chosen, device_map=inference.device_map()))
    with inference.fitting(ctx.folder.path):
        model = PeftModel.from_pretrained(loaded, adapter_dir).merge_and_unload()
    chat = ctx.template.chat_template()
    saved = ctx.source.tokenizer()  # a copy: the run's template keeps its tokenizer's own chat template
    saved.chat_template = chat  # never the tokenizer's own template when the run trained on another one
    with atomic_folder(out, replace=True) as tmp:  # an empty folder at out is replaced
        model.save_pretrained(tmp)
        saved.save_pretrained(tmp)
        (tmp / inference.RECORD).write_text(json.dumps({"run": str(ctx.folder.path.resolve()), "base": base,
                                              "dtype": result["dtype"]}, indent=2) + "\n")
    del model, loaded
    release()
    result.update(path=str(out), size_gib=folder_size_gib(out), wall_s=round(time.perf_counter() - started, 1),
                  chat_template=chat is not None)
    if not check:
        result["check"] = "not asked for"
    elif adapter is None:
        result["check"] = "no held-out rows to compare on"
    else:
        prep = ctx.prep
        merged = inference.load_merged(out, chosen)
        measured = fidelity.measure(merged, prep.tokenizer, prep.template, prep.held_out.rows, prep.held_out_examples,
                                    settings)
        del merged
        release()
        result["check"] = fidelity.compare(adapter, measured, result["dtype"], settings.metric)
    return result


def record(ctx: Context, result: dict[str, Any]) -> None:
    """The merge and its check in the run's record (``merge``: the last one)."""
    ctx.summary.merge = result
    ctx.record.write()
