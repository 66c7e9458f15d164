"""Experiment files: TOML -> a typed, validated :class:`Experiment` (``experiment``), the core sections' settings
(``sections``), the dataset formats' columns (``formats``) and comparing two configs (``diff``)."""

from fx.config.experiment import (
    Experiment,
    Selected,
    apply_override,
    check,
    from_dict,
    load,
    parse_value,
    read_toml,
)

__all__ = ["Experiment", "Selected", "apply_override", "check", "from_dict", "load", "parse_value", "read_toml"]
