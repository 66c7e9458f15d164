"""Errors a user can cause. The CLI prints them in a line or two and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave fx (a file, a key, a plugin name): exit code 2, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """Every problem found in an experiment file, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(UserError):
    """A plugin that cannot be loaded or does not follow the hook specifications; names the plugin."""


class OutOfMemory(UserError):
    """Training ran out of GPU memory (under a budget's allocator cap, or the card's): exit code 1, one line."""

    exit_code = 1
