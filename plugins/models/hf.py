"""Model source ``hf``: a hub id or a local folder in transformers format."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

import fx
from fx.errors import UserError
from fx.sources import ModelSource
from fx.sources.architectures import KNOWN_HUB_NAMES, llama_config


class HFModel(ModelSource):
    description = "a hub id or a local transformers folder (safetensors)"

    class Settings(ModelSource.Settings):
        name: str = Field(min_length=1, max_length=4096)
        revision: str | None = None
        trust_remote_code: bool = False
        # pickle (.bin/.pt) weights can run code when loaded: refused unless the experiment says so
        allow_pickle: bool = False

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.trust_remote_code = settings.trust_remote_code

    def path(self) -> str:
        return self.settings.name

    def check(self) -> list[str]:
        folder = Path(self.settings.name)
        if not folder.is_dir() or any(folder.glob("*.safetensors")):
            return []
        if not any(folder.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth")):
            return [f"model.name: {folder} holds no model weights (*.safetensors)"]
        if not self.settings.allow_pickle:
            return [f"model.name: {folder} has only pickle weights (.bin), which can run code when loaded; "
                    "convert them to safetensors, or set model.allow_pickle = true if you trust them"]
        return []

    def load(self, **kwargs):
        folder = Path(self.settings.name)
        problems = self.check()
        if problems:
            raise UserError("\n".join(problems))
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=self.trust_remote_code,
                                                        use_safetensors=False, **kwargs)
        return super().load(revision=self.settings.revision, **kwargs)

    def config(self):
        """The model's config: a local folder or the hub cache first; for a well-known name with neither, the
        published architecture from fx's table (no network needed); else the hub."""
        from transformers import AutoConfig

        name, kwargs = self.settings.name, dict(revision=self.settings.revision,
                                                trust_remote_code=self.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
            self.config_origin = f"{name} ({'local folder' if Path(name).is_dir() else 'hub cache'})"
            return config
        except OSError:
            pass
        known = KNOWN_HUB_NAMES.get(name.lower())
        if known is not None:
            self.config_origin = f"built-in architecture table ({known}, the published config of {name}; not fetched)"
            return llama_config(known)
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except OSError as exc:
            raise UserError(f"model.name: cannot read the config of {name!r}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}") from None
        self.config_origin = f"{name} (hub)"
        return config


@fx.hookimpl
def fx_register_models(register):
    register("hf", HFModel)
