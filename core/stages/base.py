"""What a stage is: a named step of ``fx run`` that reads and writes the run's context (fx.run.context).

fx's own stages (fx.stages.builtin) and a third party's (registered with ``fx_register_stages``) are the same kind of
object; a third party's is placed before or after a named stage and has its own ``[stages.<name>]`` table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fx import settings


class Stage(ABC):
    """A step of ``fx run``. A stage provides :meth:`run`; it may override :meth:`enabled` and :meth:`record`.

    * ``name``: its name in the declared list, in ``[stages.<name>]`` and in the hooks (a plugin's stage gets the
      name it is registered under);
    * ``before`` / ``after``: where a plugin's stage goes: before or after the stage of that name;
    * ``needs``: what of the context it reads (``model``, ``prep``, ``adapter``, ...), ``records``: the summary
      fields it fills; both are documentation (docs/plugins.md's table of stages is made from them);
    * ``main_only``: on several GPUs it runs on rank 0 alone (it writes files, the model is whole there);
    * ``always``: a resumed run runs it again even when the earlier segment completed it (it builds in memory what
      later stages need); any other stage that completed is not run again;
    * ``Settings``: its ``[stages.<name>]`` keys (``enabled`` switches it on or off).
    """

    name = ""
    description = ""
    before: str | None = None
    after: str | None = None
    needs: tuple[str, ...] = ()
    records: tuple[str, ...] = ()
    main_only = False
    always = False

    class Settings(settings.Settings):
        enabled: bool = True

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    def enabled(self, ctx) -> bool:
        """Whether the stage runs in this experiment."""
        return bool(getattr(self.settings, "enabled", True))

    def check(self, exp) -> list[str]:
        """What would stop this stage, found before the run folder exists and anything is trained: one line each
        (the run is refused with exit 2). Called for every stage of the list; one the experiment leaves off says
        nothing."""
        return []

    def done(self, ctx) -> bool:
        """Whether a resumed run's earlier segment completed this stage, so that it is not run again."""
        return not self.always and ctx.done(self.name)

    @abstractmethod
    def run(self, ctx) -> dict[str, Any]:
        """Do the stage's work on the run's context (fx.run.context.Context); return what it measured."""

    def record(self, ctx, result: dict[str, Any]) -> None:
        """Put the result into the run's record: a plugin's stage's numbers and strings go into the summary's
        ``results[<name>]``, and its numbers to every tracker (``<name>_<key>``, at the step the run stands at).
        fx's own stages fill their typed fields in :meth:`run` and record nothing more here."""
        kept = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        ctx.summary.results = {**ctx.summary.results, self.name: kept}
        numbers = {f"{self.name}_{k}": v for k, v in kept.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and ctx.run is not None:
            ctx.run.log(ctx.step(), numbers)
