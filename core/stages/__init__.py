"""``fx run`` as a declared list of stages walked by one loop (fx.stages.order), each a :class:`Stage` over the run's
context (fx.run.context). fx's own stages live in fx.stages.builtin; a plugin adds one with ``fx_register_stages``,
wraps any with ``fx_stage_run`` and observes them with ``fx_stage_start``/``fx_stage_end``."""

from fx.stages.base import Stage

__all__ = ["Stage"]
