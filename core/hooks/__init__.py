"""Plugins: the hook specifications (``specs``) and the plugin manager that loads and registers them (``manager``)."""
