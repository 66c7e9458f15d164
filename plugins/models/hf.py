"""Model source ``hf``: a hub id or a local folder in transformers format."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

import fx
from fx.errors import UserError
from fx.sources import ModelSource
from fx.sources.architectures import KNOWN_HUB_NAMES, llama_config
from fx.sources.folders import folder_problems, real_safetensors


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

    def _folder(self) -> Path | None:
        """The local folder ``model.name`` names, or None for a hub id."""
        folder = Path(self.settings.name).expanduser()
        try:
            local = folder.is_dir() or self.settings.name.startswith(("/", ".", "~"))
        except OSError:
            local = True
        return folder if local else None

    def check(self) -> list[str]:
        folder = self._folder()
        if folder is None:
            return []
        if not folder.is_dir():
            return [f"model.name: no such model folder {self.settings.name!r}"]
        return folder_problems(folder, "model.name", self.trust_remote_code, self.settings.allow_pickle)

    def path(self) -> str:
        folder = self._folder()
        return str(folder) if folder is not None else self.settings.name

    def load(self, **kwargs):
        problems = self.check()
        if problems:
            raise UserError("\n".join(problems))
        folder = self._folder()
        if folder is not None and not any(real_safetensors(w) for w in folder.glob("*.safetensors")):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=self.trust_remote_code,
                                                        use_safetensors=False, **kwargs)
        return super().load(revision=self.settings.revision, **kwargs)

    def tokenizer(self):
        try:
            return super().tokenizer()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged or missing tokenizer
            raise UserError(f"model.name: cannot load the tokenizer of {self.settings.name!r}: {type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}") from None

    def config(self):
        """The model's config: a local folder or the hub cache first; for a well-known name with neither, the
        published architecture from fx's table (no network needed); else the hub."""
        from transformers import AutoConfig

        name, kwargs = self.path(), dict(revision=self.settings.revision, trust_remote_code=self.trust_remote_code)
        problems = self.check()
        if problems:
            raise UserError("\n".join(problems))
        if self.trust_remote_code:
            print(f"fx: model.trust_remote_code = true: {name}'s own Python code (its auto_map) will be run",
                  file=sys.stderr)
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
            self.config_origin = f"{name} ({'local folder' if Path(name).is_dir() else 'hub cache'})"
            return config
        except OSError:
            if self._folder() is not None:
                raise UserError(f"model.name: cannot read the config of {name!r}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"model.name: cannot read the config of {name!r}: {type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}") from None
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
