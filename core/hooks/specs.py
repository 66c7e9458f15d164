"""Every hook fx calls. Plugins implement them with ``@fx.hookimpl``; docs/plugins.md has the guide.

Register-callback hooks (``fx_register_*``) are called once, when the plugin manager starts; run-lifecycle hooks
while a run goes on (trackers and any other plugin observe them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("fx")
hookimpl = pluggy.HookimplMarker("fx")

Register = Callable[[str, type], None]


@hookspec
def fx_register_templates(register: Register) -> None:
    """Register prompt templates: subclasses of :class:`fx.Template`, selected by ``[template] name``.

    :param register: ``register(name, cls)``; fx records which plugin registered ``name`` and refuses a second
        registration of it.
    """


@hookspec
def fx_register_methods(register: Register) -> None:
    """Register training methods: subclasses of :class:`fx.Method`, selected by ``[method] name``.

    :param register: ``register(name, cls)``, as for templates.
    """


@hookspec
def fx_register_trackers(register: Register) -> None:
    """Register trackers: subclasses of :class:`fx.Tracker`, switched on by ``[trackers.<name>]``.

    :param register: ``register(name, cls)``, as for templates.
    """


@hookspec
def fx_register_models(register: Register) -> None:
    """Register model sources: subclasses of :class:`fx.ModelSource`, selected by ``[model] source``.

    :param register: ``register(name, cls)``, as for templates.
    """


@hookspec
def fx_register_datasets(register: Register) -> None:
    """Register dataset sources: subclasses of :class:`fx.DatasetSource`, selected by ``[data] source``.

    :param register: ``register(name, cls)``, as for templates.
    """


@hookspec
def fx_register_stages(register: Register) -> None:
    """Register stages: subclasses of :class:`fx.Stage`, placed in ``fx run``'s declared list of stages before or
    after a named one (the class's ``before`` or ``after``), with their own ``[stages.<name>]`` table validated by
    the class's ``Settings``.

    :param register: ``register(name, cls)``, as for templates.
    """


@hookspec
def fx_run_start(run: Any) -> None:
    """A run begins: its directory exists and holds ``config.toml`` and ``env.json``.

    :param run: the run (:class:`fx.run.Run`): ``name``, ``dir``, ``config`` (the resolved experiment as a dict),
        ``resume_step`` (the checkpoint's step when the run resumes, else None).
    """


@hookspec
def fx_log(run: Any, step: int, metrics: dict[str, float]) -> None:
    """Metrics were logged.

    :param run: the run, as for :func:`fx_run_start`; ``run.max_steps`` is known once training has started.
    :param step: the optimizer step, counted from 1; 0 holds the measurements taken before training.
    :param metrics: name -> value: ``loss``, ``learning_rate``, ``tokens_per_s``, ... as the method's trainer logs
        them; held-out metrics carry an ``eval_`` prefix; on a GPU, ``peak_vram_gib`` is the most memory the CUDA
        allocator has reserved so far.
    """


@hookspec
def fx_stage_start(run: Any, stage: str) -> None:
    """A stage begins.

    :param run: the run, as for :func:`fx_run_start`.
    :param stage: the stage's name: one of the declared list (``fx.stages.declared``; docs/plugins.md, "Stages",
        is generated from it), in its order, each when the experiment enables it.
    """


@hookspec(firstresult=True)
def fx_stage_run(stage: Any, context: Any) -> dict[str, Any] | None:
    """Run a stage; fx's own implementation calls ``stage.run(context)``. Wrap it to act around any stage
    (``@fx.hookimpl(wrapper=True)``, then ``result = yield``); an implementation marked ``tryfirst=True`` that
    returns a dict runs the stage in its place. Called on every rank.

    :param stage: the stage (:class:`fx.Stage`): ``name``, ``settings`` (its ``[stages.<name>]`` table).
    :param context: the run's context (:class:`fx.run.context.Context`): ``exp``, ``prep`` (the data, prepared
        once), ``method``, ``source``, ``tokenizer``, ``template`` (each built once), ``folder``, ``summary`` (the
        typed record), ``run`` and ``model`` (the model in memory).
    :return: what the stage measured (a dict; may be empty), as ``fx_stage_end`` receives it.
    """


@hookspec
def fx_stage_end(run: Any, stage: str, result: dict[str, Any]) -> None:
    """A stage ended.

    :param run: the run, as for :func:`fx_run_start`.
    :param stage: the stage's name, as for :func:`fx_stage_start`.
    :param result: what the stage measured (may be empty).
    """


@hookspec
def fx_run_end(run: Any, summary: dict[str, Any], error: BaseException | None) -> None:
    """The run ended; ``summary.json`` and ``plots/loss.png`` are written.

    :param run: the run, as for :func:`fx_run_start`.
    :param summary: what ``summary.json`` holds.
    :param error: the exception that ended the run, or None when it completed.
    """
