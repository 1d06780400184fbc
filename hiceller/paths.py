"""Output paths checked before any work: a user's mistake costs one line, not an hour of compute.

Every command that writes checks its outputs first: an output file must not be an existing folder
or one of the inputs, an output folder must not be a file, and the nearest existing parent must be a
writable folder. What a command then writes goes to a temporary sibling that is renamed into place,
so a failure leaves nothing half-written (see pretrain/layout.py for bundles).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hiceller.errors import InputError

__all__ = ["check_output_file", "check_output_dir", "check_writable"]


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(path: Path, flag: str) -> None:
    """``path`` can be created or written: its nearest existing ancestor is a folder a file can be
    created in (tried for real: permission bits say nothing for root or on a read-only mount)."""
    anchor = _nearest_existing(Path(path).parent if not Path(path).is_dir() else Path(path))
    if not anchor.is_dir():
        raise InputError(f"{flag} {path}: {anchor} is a file, not a folder")
    try:
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise PermissionError
        with tempfile.TemporaryFile(dir=anchor, prefix=".hiceller-write-check-"):
            pass
    except OSError:
        raise InputError(f"{flag} {path}: {anchor} is not writable") from None


def check_output_file(path: Path, flag: str, inputs: tuple[Path, ...] = (), overwrite: bool = True, suffix: str | None = None) -> None:
    """An output file: not a folder, not an input, in a writable place (and new unless ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; name a file")
    if suffix and path.suffix != suffix:
        raise InputError(f"{flag} {path}: name a {suffix} file")
    for i in inputs:
        if Path(i).exists() and path.exists() and path.resolve() == Path(i).resolve():
            raise InputError(f"{flag} {path} is the input file; write to a new file")
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {path} already exists")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is read-only")
    check_writable(path, flag)


def check_output_dir(path: Path, flag: str, must_be_empty: bool = False) -> None:
    """An output folder: not a file, in a writable place (and empty when asked)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file; name a folder")
    if must_be_empty and path.is_dir() and any(path.iterdir()):
        raise InputError(f"{flag} {path} is not empty; choose a new one")
    check_writable(path if path.exists() else path.parent / "x", flag)
