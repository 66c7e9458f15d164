"""Where models and rows come from: the base classes of model sources and dataset sources, the cache folder they
share, the published architectures (``architectures``) and the bundled model (``bundled``)."""

from __future__ import annotations

import os
from pathlib import Path

from fx import settings


def cache_dir() -> Path:
    """Where converted and generated models live: ``$FX_CACHE`` or ``~/.cache/fx``."""
    return Path(os.environ.get("FX_CACHE") or Path.home() / ".cache" / "fx")


class ModelSource:
    """Where a model comes from. The config and tokenizer are available without loading weights."""

    description = ""
    trust_remote_code = False

    class Settings(settings.Settings):
        pass

    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self) -> list[str]:
        """Problems found without loading weights (each a line naming the key); checked before a run starts."""
        return []

    def path(self) -> str:
        """A hub id or a local folder that ``from_pretrained`` loads."""
        raise NotImplementedError

    config_origin = ""  # where config() found the config, set by config(); fx plan prints it

    def config(self):
        from transformers import AutoConfig

        self.config_origin = self.path()
        return AutoConfig.from_pretrained(self.path(), trust_remote_code=self.trust_remote_code)

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path(), trust_remote_code=self.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load(self, **kwargs):
        """The model, loaded with ``kwargs`` for ``from_pretrained`` (quantization_config, dtype, device_map)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.path(), trust_remote_code=self.trust_remote_code, use_safetensors=True, **kwargs
        )


class DatasetSource:
    """Where rows come from: a train split and, when the source has one, a held-out split."""

    description = ""

    class Settings(settings.Settings):
        pass

    def __init__(self, settings: Settings, base_dir: Path):
        self.settings = settings
        self.base_dir = base_dir

    def check(self) -> list[str]:
        """Problems found without loading (a missing file); each a line naming the key."""
        return []

    def origin(self, held_out: bool = False) -> str:
        """Where the training (or held-out) rows come from, as messages about a row name it: a file's path, say."""
        return "data (held-out)" if held_out else "data (train)"

    def load(self):
        """``(train, eval_or_None)`` as ``datasets.Dataset`` objects."""
        raise NotImplementedError
