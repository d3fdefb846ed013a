"""Addresses: an IP literal and a port. A leaf module, imported by the configuration, the core
and the servers alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP literal and a port; ``host`` is normalized by :mod:`ipaddress`, without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"
