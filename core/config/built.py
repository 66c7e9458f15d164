"""The plugins an experiment names, each built once, when first asked for.

Every stage of a run, and every command on a finished one, asks ``exp.built`` for the model source, tokenizer,
template, dataset source and method instead of building its own: one object of each per experiment, so that a
plugin's constructor (and a tokenizer's loading) runs once however many stages use it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any


class Built:
    def __init__(self, exp):
        self.exp = exp

    @cached_property
    def source(self) -> Any:
        """The model source (:class:`fx.ModelSource`) of ``[model]``."""
        return self.exp.model.cls(self.exp.model.settings)

    @cached_property
    def dataset(self) -> Any:
        """The dataset source (:class:`fx.DatasetSource`) of ``[data]``."""
        return self.exp.dataset.cls(self.exp.dataset.settings, self.exp.base_dir)

    @cached_property
    def method(self) -> Any:
        """The method (:class:`fx.Method`) of ``[method]``."""
        return self.exp.method.cls(self.exp.method.settings)

    @cached_property
    def tokenizer(self) -> Any:
        """The model source's tokenizer."""
        return self.source.tokenizer()

    @cached_property
    def template(self) -> Any:
        """The template (:class:`fx.Template`) of ``[template]``, over :attr:`tokenizer`."""
        return self.exp.template.cls(self.exp.template.settings, self.tokenizer)
