"""Which upstreams a question goes to: the longest configured zone that contains the name.

Zones are matched on whole labels ("local" contains "a.local" but not "a.nonlocal"), in the
lowercased wire form the cache key already holds, so no text conversion happens on a miss.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Generic, TypeVar

Target = TypeVar("Target")


@functools.lru_cache(maxsize=1024)  # zone names, on every store: made once
def name_to_wire(name: str) -> bytes:
    """'Resource-Server.local.' -> b'\\x0fresource-server\\x05local\\x00' (lowercased)."""
    labels = [label for label in name.lower().rstrip(".").split(".") if label]
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in labels) + b"\x00"


def wire_to_name(wire_name: bytes) -> str:
    """The dotted text form of an uncompressed wire name ('.' for the root)."""
    labels = []
    offset = 0
    while offset < len(wire_name) and wire_name[offset]:
        length = wire_name[offset]
        labels.append(wire_name[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    return ".".join(labels) + "." if labels else "."


class ZoneRouter(Generic[Target]):
    """Longest-suffix match of a wire name against the configured zones."""

    def __init__(self, default: Target, zones: Mapping[str, Target]) -> None:
        self.default = default
        self._zones = {name_to_wire(name): (name, target) for name, target in zones.items()}

    def route(self, wire_name: bytes) -> tuple[str, Target]:
        """(zone name, its target) for a lowercased wire name; zone '.' means the default."""
        if not self._zones:  # the default alone (no discovery zone, one answer order): no walk
            return ".", self.default
        offset = 0
        while offset < len(wire_name) and wire_name[offset]:
            hit = self._zones.get(wire_name[offset:])
            if hit is not None:
                return hit
            offset += 1 + wire_name[offset]
        return ".", self.default

    def targets(self) -> list[tuple[str, Target]]:
        """Every zone with its target, the default ('.') first."""
        return [(".", self.default), *self._zones.values()]
