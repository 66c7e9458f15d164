"""fx: plugin-based experiments for parameter-efficient fine-tuning of Llama-class models.

The plugin API, in one place::

    import fx

    class Shout(fx.Template):
        ...

    @fx.hookimpl
    def fx_register_templates(register):
        register("shout", Shout)

docs/plugins.md is the guide to each kind of plugin and every hook.
"""

from fx.data.templating import Message, Rendered, Template
from fx.errors import UserError
from fx.hooks.specs import hookimpl
from fx.run.tracking import Tracker
from fx.settings import Settings
from fx.sources import DatasetSource, ModelSource
from fx.stages.base import Stage
from fx.training.method import Method, Session
from fx.training.qlora import QLoraMethod

__version__ = "0.1.0"

__all__ = ["DatasetSource", "Message", "Method", "ModelSource", "QLoraMethod", "Rendered", "Session", "Settings",
           "Stage", "Template", "Tracker", "UserError", "__version__", "hookimpl"]
