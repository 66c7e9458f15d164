"""A local model folder checked without loading it: a config.json that parses and describes a causal language model
transformers knows (or custom code the experiment trusts, named), sizes that are positive integers, a tokenizer.json
that parses, and weights that are real safetensors (their header read), so that a model source's ``check()`` gives
a clear line before the planner, the tokenizer or transformers would fail on the same folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
PICKLE = ("*.bin", "*.pt", "*.pth")


def _json(path: Path) -> tuple[object, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read it ({getattr(exc, 'strerror', None) or exc})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is no whole safetensors file (empty, a header that is no JSON, or shorter than the tensors its
    header places in it), or None; read without loading a tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "empty" if not size else "not a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 2**20):
                return "not a safetensors file"
            header = json.loads(fh.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "not a safetensors file"
    return f"cut short ({size} bytes of {8 + length + end})" if size < 8 + length + end else None


def real_safetensors(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file (:func:`safetensors_problem`)."""
    return safetensors_problem(path) is None


def config_problems(config: dict, folder: Path, key: str, trust_remote_code: bool) -> list[str]:
    from transformers import CONFIG_MAPPING

    problems = []
    model_type = config.get("model_type")
    custom = config.get("auto_map")
    if custom and not trust_remote_code and model_type not in CONFIG_MAPPING:
        files = sorted({str(v).split(".")[0] + ".py" for v in (custom.values() if isinstance(custom, dict) else [])})
        problems.append(f"{key}: {folder} needs its own code ({', '.join(files) or 'auto_map'} in that folder); set "
                        f"{key.rsplit('.', 1)[0]}.trust_remote_code = true to run it, if you trust that code")
    elif not isinstance(model_type, str) or (model_type not in CONFIG_MAPPING and not custom):
        problems.append(f"{key}: {folder}/config.json has model_type {model_type!r}, which transformers does not know")
    if config.get("is_encoder_decoder"):
        problems.append(f"{key}: {folder} is an encoder-decoder model ({model_type}); fx fine-tunes causal "
                        "(decoder-only) language models")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for name in SIZES:
        value = text.get(name)
        if name in text and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            problems.append(f"{key}: {folder}/config.json: {name} = {json.dumps(value)} is not a positive integer")
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if (isinstance(hidden, int) and isinstance(heads, int) and hidden > 0 and heads > 0 and hidden % heads
            and not text.get("head_dim")):
        problems.append(f"{key}: {folder}/config.json: hidden_size {hidden} is not a multiple of "
                        f"num_attention_heads {heads}")
    return problems


def folder_problems(folder: Path, key: str = "model.name", trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> list[str]:
    """What is wrong with the model folder ``folder`` (each a line naming ``key``); [] when it looks loadable."""
    try:
        if not (folder / "config.json").is_file():
            return [f"{key}: {folder} has no config.json: not a transformers model folder"]
        config, why = _json(folder / "config.json")
        if why or not isinstance(config, dict):
            return [f"{key}: {folder}/config.json: {why or 'not a JSON object'}"]
        problems = config_problems(config, folder, key, trust_remote_code)
        if (folder / "tokenizer.json").is_file():
            _, why = _json(folder / "tokenizer.json")
            if why:
                problems.append(f"{key}: {folder}/tokenizer.json: {why}")
        weights = sorted(folder.glob("*.safetensors"))
        broken = [w.name for w in weights if not real_safetensors(w)]
        if broken:
            problems.append(f"{key}: {folder}: {', '.join(broken[:3])} is not a readable safetensors file "
                            "(empty, truncated or something else)")
        elif not weights:
            if not any(any(folder.glob(pattern)) for pattern in PICKLE):
                problems.append(f"{key}: {folder} holds no model weights (*.safetensors)")
            elif not allow_pickle:
                problems.append(f"{key}: {folder} has only pickle weights (.bin), which can run code when loaded; "
                                f"convert them to safetensors, or set {key.rsplit('.', 1)[0]}.allow_pickle = true "
                                "if you trust them")
        return problems
    except OSError as exc:
        return [f"{key}: cannot read {folder}: {exc.strerror or exc}"]
