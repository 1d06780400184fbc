"""DeepSpeed hostfiles and ``--include`` / ``--exclude`` filters, checked before anything starts.

A hostfile has one ``host slots=N`` line per node; ``#`` starts a comment, blank lines are
skipped. DeepSpeed itself stops at the first bad line with a ValueError deep inside its launcher;
here every problem names the file and the line, and a filter naming a host or slot the hostfile
does not have is refused up front. Resolution follows DeepSpeed's ``runner.py`` exactly: a host
keeps its hostfile order, a filtered host keeps the slots left to it, ``num_nodes`` keeps the
first N hosts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hiceller.errors import InputError

__all__ = [
    "HostEntry",
    "Hostfile",
    "parse_hostfile",
    "read_hostfile",
    "format_hostfile",
    "check_gpus_per_node",
    "parse_resource_spec",
    "resolve_resources",
]

_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_LINE = re.compile(rf"^(?P<host>{_HOST})\s+slots=(?P<slots>\S+)$")
_HOST_ONLY = re.compile(rf"^{_HOST}$")


@dataclass(frozen=True)
class HostEntry:
    """One ``host slots=N`` line."""

    host: str
    slots: int
    line: int
    """1-based line number in the hostfile."""


@dataclass(frozen=True)
class Hostfile:
    """A parsed, validated hostfile; hosts in file order."""

    source: str
    entries: tuple[HostEntry, ...]

    @property
    def hosts(self) -> list[str]:
        return [e.host for e in self.entries]

    @property
    def slots(self) -> dict[str, int]:
        """host -> slot count, in file order."""
        return {e.host: e.slots for e in self.entries}

    @property
    def world_size(self) -> int:
        return sum(e.slots for e in self.entries)


def _parse_slots(text: str, where: str) -> int:
    try:
        slots = int(text)
    except ValueError:
        raise InputError(f"{where}: slots must be an integer, got {text!r}") from None
    if slots < 1:
        raise InputError(f"{where}: slots must be >= 1, got {slots}")
    return slots


def _parse_line(raw: str, where: str, lineno: int) -> HostEntry | None:
    line = raw.split("#", 1)[0].strip()
    if not line:
        return None
    m = _LINE.match(line)
    if m is None:
        raise InputError(f"{where}: expected 'HOST slots=N', got {raw.strip()!r}")
    return HostEntry(m["host"], _parse_slots(m["slots"], where), lineno)


def parse_hostfile(text: str, source: str = "<hostfile>") -> Hostfile:
    """Parse hostfile text; ``source`` names the file in error messages."""
    seen: dict[str, HostEntry] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        entry = _parse_line(raw, f"hostfile {source} line {lineno}", lineno)
        if entry is None:
            continue
        if entry.host in seen:
            raise InputError(
                f"hostfile {source} line {lineno}: host {entry.host!r} is already listed on line "
                f"{seen[entry.host].line}"
            )
        seen[entry.host] = entry
    if not seen:
        raise InputError(f"hostfile {source}: no 'HOST slots=N' lines")
    return Hostfile(source, tuple(seen.values()))


def read_hostfile(path: str | Path) -> Hostfile:
    """Read and parse a hostfile, or raise InputError naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"hostfile {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"hostfile {p}: cannot read ({e})") from None
    return parse_hostfile(text, str(p))


def format_hostfile(slots: Mapping[str, int]) -> str:
    """Hostfile text for ``host -> slots``."""
    return "".join(f"{host} slots={n}\n" for host, n in slots.items())


def check_gpus_per_node(hostfile: Hostfile, gpus_per_node: int) -> None:
    """Every host must have exactly ``gpus_per_node`` slots."""
    for e in hostfile.entries:
        if e.slots != gpus_per_node:
            raise InputError(
                f"hostfile {hostfile.source} line {e.line}: host {e.host!r} has slots={e.slots} but "
                f"--gpus-per-node is {gpus_per_node}; make them agree"
            )


def _parse_node_spec(spec: str, flag: str) -> tuple[str, list[int]]:
    host, sep, slot_text = spec.partition(":")
    if not _HOST_ONLY.match(host):
        raise InputError(f"{flag} {spec!r}: expected HOST or HOST:SLOT[,SLOT...]")
    if not sep:
        return host, []
    slots = []
    for item in slot_text.split(","):
        if not item.isdigit():
            raise InputError(f"{flag} {spec!r}: slot {item!r} is not a non-negative integer")
        slots.append(int(item))
    return host, slots


def parse_resource_spec(spec: str, flag: str = "--include") -> dict[str, list[int]]:
    """Parse DeepSpeed's ``NODE_SPEC[@NODE_SPEC...]``, ``NODE_SPEC = HOST[:SLOT[,SLOT...]]``.

    Returns host -> sorted slots; an empty list means the whole host.
    """
    if not spec.strip():
        raise InputError(f"{flag}: empty resource string")
    out: dict[str, list[int]] = {}
    for node_spec in spec.split("@"):
        host, slots = _parse_node_spec(node_spec.strip(), flag)
        # Slot lists of a repeated host are merged, as DeepSpeed does ("h@h:0" means slot 0).
        out[host] = sorted(set(out.get(host, []) + slots))
    return out


def _check_against(hostfile: Hostfile, wanted: dict[str, list[int]], flag: str) -> None:
    pool = hostfile.slots
    for host, slots in wanted.items():
        if host not in pool:
            raise InputError(f"{flag}: host {host!r} is not in hostfile {hostfile.source} (hosts: {', '.join(pool)})")
        for s in slots:
            if s >= pool[host]:
                raise InputError(
                    f"{flag}: slot {s} does not exist on host {host!r} (hostfile {hostfile.source} gives it "
                    f"slots 0-{pool[host] - 1})"
                )


def _remaining(slots: list[int], dropped: list[int] | None) -> list[int]:
    """Slots left on a host after --exclude: None = not named, [] = the whole host is dropped."""
    if dropped is None:
        return slots
    return [s for s in slots if dropped and s not in dropped]


def _apply_filter(hostfile: Hostfile, include: str, exclude: str) -> dict[str, list[int]]:
    active = {h: list(range(n)) for h, n in hostfile.slots.items()}
    if include:
        wanted = parse_resource_spec(include, "--include")
        _check_against(hostfile, wanted, "--include")
        return {h: (wanted[h] or slots) for h, slots in active.items() if h in wanted}
    if exclude:
        dropped = parse_resource_spec(exclude, "--exclude")
        _check_against(hostfile, dropped, "--exclude")
        kept = {h: _remaining(slots, dropped.get(h)) for h, slots in active.items()}
        return {h: s for h, s in kept.items() if s}
    return active


def resolve_resources(
    hostfile: Hostfile, include: str = "", exclude: str = "", num_nodes: int | None = None
) -> dict[str, list[int]]:
    """host -> slot ids the launch will use, as DeepSpeed's runner resolves them."""
    if include and exclude:
        raise InputError("--include and --exclude cannot be used together")
    if num_nodes is not None and (include or exclude):
        raise InputError("--nodes cannot be combined with --include/--exclude (DeepSpeed refuses both)")
    active = _apply_filter(hostfile, include, exclude)
    if not active:
        raise InputError(f"--exclude {exclude!r} leaves no slots in hostfile {hostfile.source}")
    if num_nodes is not None:
        if num_nodes < 1 or num_nodes > len(active):
            raise InputError(
                f"--nodes {num_nodes}: hostfile {hostfile.source} has {len(active)} host(s)"
            )
        active = dict(list(active.items())[:num_nodes])
    return active
