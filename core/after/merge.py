"""Merging a run's adapter into its base, as the QLoRA tutorial does by hand: free the 4-bit model, reload the
base in 16 bits, add the adapter's weights into it, and save a standard transformers model (safetensors, the
tokenizer, and a chat template that prompts it the way it was trained) that loads with no fx installed.

The merged model is the 16-bit base plus the adapter; the adapter was trained on the 4-bit base, so its held-out
numbers can differ from ``eval_after`` by the quantisation error (docs/after-training.md has the measurement).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from fx.after import inference
from fx.config import Experiment
from fx.errors import UserError
from fx.files import atomic_folder
from fx.training.devices import compute_dtype, device, dtype_name


def release() -> None:
    """Give back the memory of models no longer referenced (the GPU's cache included) before loading another."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def folder_size_gib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30, 3)


def merge(exp: Experiment, run_dir: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Merge the run's adapter into its base loaded in ``dtype`` (``auto``: bf16/fp16 on a GPU, float32 on CPU)
    and write the model into ``out`` (written beside, then renamed into place)."""
    import torch
    from peft import PeftModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; remove it or choose another --out")
    adapter = inference.adapter_dir(run_dir)
    source = exp.model.cls(exp.model.settings)
    tokenizer = source.tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    chosen = compute_dtype(dtype)

    release()
    result: dict[str, Any] = {"dtype": dtype_name(chosen)}
    if torch.cuda.is_available():  # what the previous (4-bit) model still holds when the 16-bit base comes in
        result["vram_allocated_before_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    base = source.load(dtype=chosen, device_map={"": 0} if device() == "cuda" else {"": "cpu"})
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()

    chat = template.chat_template()
    tokenizer.chat_template = chat  # never the tokenizer's own template when the run trained on another one
    with atomic_folder(out, replace=True) as tmp:  # an empty folder at out is replaced
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del model, base
    release()
    result.update(path=str(out), size_gib=folder_size_gib(out), chat_template=chat is not None)
    return result
