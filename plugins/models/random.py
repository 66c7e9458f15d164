"""Model source ``random``: a named architecture initialised at random.

Memory and speed depend on the architecture, not on the weights, so the reference case (Llama 2 7B) can be
measured with no download. The weights are written once into the cache as safetensors and then loaded through
the same ``from_pretrained`` path as a real model, quantisation included. The tokenizer is the bundled model's
byte-level BPE cut to the architecture's vocabulary size, so real text can be trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

import fx
from fx.files import atomic_folder
from fx.sources import bundled, cache_dir
from fx.sources.architectures import ARCHITECTURES, llama_config


def cut_tokenizer(source: Path, out: Path, vocab_size: int) -> None:
    """Write ``source``'s byte-level BPE tokenizer limited to ids below ``vocab_size`` into ``out``.

    Merges are kept only when both parts and their result stay in the smaller vocabulary, so every text
    still tokenizes (down to bytes at worst) and no id reaches past the embedding table.
    """
    from transformers import AutoTokenizer

    data = json.loads((source / "tokenizer.json").read_text())
    model = data["model"]
    vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    model["vocab"], model["merges"] = vocab, merges
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    with atomic_folder(out) as tmp:
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        (tmp / "tokenizer.json").write_text(json.dumps(data))
        AutoTokenizer.from_pretrained(tmp)  # proves the cut tokenizer loads before it is put in place


class RandomModel(fx.ModelSource):
    description = "a named architecture with random weights: " + ", ".join(ARCHITECTURES)

    class Settings(fx.ModelSource.Settings):
        architecture: Literal[tuple(ARCHITECTURES)] = "tiny"  # type: ignore[valid-type]
        seed: int = Field(0, ge=0, le=2**32 - 1)
        dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def config(self):
        self.config_origin = f"built-in architecture table ({self.settings.architecture})"
        return llama_config(self.settings.architecture)

    def _folder(self) -> Path:
        s = self.settings
        return cache_dir() / "models" / f"random-{s.architecture}-seed{s.seed}-{s.dtype}"

    def path(self) -> str:
        folder = self._folder()
        if not (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
            self._write(folder)
        return str(folder)

    def _tokenizer_folder(self) -> Path:
        folder = self._folder()
        tok_dir = folder.with_name(folder.name + ".tokenizer")
        if not tok_dir.is_dir():
            cut_tokenizer(bundled.model_folder(), tok_dir, self.config().vocab_size)
        return tok_dir

    def tokenizer(self):
        """The cut tokenizer, without writing the weights: ``fx data`` of a 70B architecture needs no 129 GiB."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._tokenizer_folder())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _write(self, folder: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        tok_dir = self._tokenizer_folder()
        dtype = getattr(torch, self.settings.dtype)
        config = self.config()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(dtype)
        gen = torch.Generator().manual_seed(self.settings.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
            for f in tok_dir.iterdir():
                shutil.copy(f, tmp / f.name)


@fx.hookimpl
def fx_register_models(register):
    register("random", RandomModel)
