"""The one error type users see: a message that names the problem, printed as one line."""

from __future__ import annotations

__all__ = ["HicellerError", "ConfigError", "InputError", "StoreError"]


class HicellerError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""


class ConfigError(HicellerError):
    """A config preset, key or value that cannot be used."""


class InputError(HicellerError):
    """An input file (h5ad, hostfile, bundle, ...) that cannot be used."""


class StoreError(HicellerError):
    """A store that is missing, not a HiCeller SOMA experiment, or inconsistent."""
