"""fx: plugin-based experiments for parameter-efficient fine-tuning of Llama-class models.

Plugin authors need only what this module exports::

    import fx

    @fx.hookimpl
    def fx_register_templates(register):
        register("mytemplate", MyTemplate)
"""

from fx.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
