"""Every hook fx calls. Plugins implement them with ``@fx.hookimpl``.

Two kinds of hooks:

* register-callback hooks (``fx_register_*``) are called once when the plugin manager starts. Each receives
  ``register(name, cls)``; the class it registers is the named thing an experiment file selects
  (``[template] name = "llama2"``). fx records which plugin registered what and refuses duplicates.
* run-lifecycle hooks are called while a run goes on; trackers and any other plugin observe them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from fx.run import Run

hookspec = pluggy.HookspecMarker("fx")
hookimpl = pluggy.HookimplMarker("fx")

Register = Callable[[str, type], None]


@hookspec
def fx_register_templates(register: Register) -> None:
    """Register prompt templates: subclasses of :class:`fx.templating.Template`.

    A template renders a conversation for training (text plus the character spans that carry loss) and for
    generation (the same text, ending where the answer begins); docs/plugins.md, "Writing a template".

    :param register: ``register(name, cls)``; ``name`` is what ``[template] name`` selects.
    """


@hookspec
def fx_register_methods(register: Register) -> None:
    """Register training methods: subclasses of :class:`fx.method.Method` (``[method] name``)."""


@hookspec
def fx_register_trackers(register: Register) -> None:
    """Register trackers: subclasses of :class:`fx.tracking.Tracker` (``[trackers.<name>]``)."""


@hookspec
def fx_register_models(register: Register) -> None:
    """Register model sources: subclasses of :class:`fx.sources.ModelSource` (``[model] source``)."""


@hookspec
def fx_register_datasets(register: Register) -> None:
    """Register dataset sources: subclasses of :class:`fx.sources.DatasetSource` (``[data] source``)."""


@hookspec
def fx_run_start(run: Run) -> None:
    """A run begins: its directory exists and holds ``config.toml`` and ``env.json``.

    :param run: the run: ``run.name``, ``run.dir``, ``run.config`` (the resolved experiment as a dict).
    """


@hookspec
def fx_log(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Metrics were logged at an optimizer step (``loss``, ``learning_rate``, ``tokens_per_s``, ...).

    Evaluation metrics carry an ``eval_`` prefix. ``step`` counts optimizer steps from 1; step 0 holds
    measurements taken before training. On a GPU, fx adds ``peak_vram_gib``: the most memory the CUDA
    allocator has reserved so far in the run.
    """


@hookspec
def fx_stage_start(run: Run, stage: str) -> None:
    """A stage begins. In order: ``"load"``, ``"evaluate_before"``, ``"generate_before"``, ``"train"``, ``"save"``,
    ``"evaluate_after"``, ``"generate_after"``, ``"merge"``; the evaluate, generate and merge stages run when
    ``[stages.*]`` enables them (merge is off by default).
    """


@hookspec
def fx_stage_end(run: Run, stage: str, result: dict[str, Any]) -> None:
    """A stage ended. ``result`` holds what the stage measured (may be empty)."""


@hookspec
def fx_run_end(run: Run, summary: dict[str, Any], error: BaseException | None) -> None:
    """The run ended. ``summary`` is what ``summary.json`` holds; ``error`` is set when the run failed."""
