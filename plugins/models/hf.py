"""Model source ``hf``: a hub id or a local folder in transformers format."""

from __future__ import annotations

from pydantic import Field

import fx
from fx.sources import ModelSource


class HFModel(ModelSource):
    description = "a hub id or a local transformers folder (safetensors)"

    class Settings(ModelSource.Settings):
        name: str = Field(min_length=1, max_length=4096)
        revision: str | None = None
        trust_remote_code: bool = False

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.trust_remote_code = settings.trust_remote_code

    def path(self) -> str:
        return self.settings.name

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            self.settings.name, revision=self.settings.revision, trust_remote_code=self.trust_remote_code
        )


@fx.hookimpl
def fx_register_models(register):
    register("hf", HFModel)
