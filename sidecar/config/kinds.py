"""Kinds of value: each knows how to read itself from TOML and from text (env var, flag).

A setting's kind is what makes the three sources agree: the file hands it a TOML value, the
environment and the flags hand it text, and either way the same checks run and a bad value is
a ConfigError naming the key as the operator wrote it. A kind also says how its flag looks
(metavar, nargs) and how its default is shown in --help.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from sidecar.addresses import HostPort, is_wildcard, parse_hostport
from sidecar.config.names import normalize_zone_name
from sidecar.core.access import IpNetwork
from sidecar.errors import ConfigError

T = TypeVar("T")


class Kind:
    """How one setting is parsed and checked; values are kept as ``Any`` in the generic layers."""

    metavar = "VALUE"
    allowed = ""
    separator = ","  # joins the values of a repeated CLI flag
    nargs: str | None = None  # argparse nargs of the flag ("?": the value may be left out)
    const: str | None = None  # the flag's value when it is given without one

    def from_toml(self, value: object, key: str) -> Any:
        if not isinstance(value, str):
            raise ConfigError(key, value, self.allowed)
        return self.from_text(value, key)

    def from_text(self, text: str, key: str) -> Any:
        raise NotImplementedError

    def merge(self, lower: Any, higher: Any) -> Any:
        """Combine a lower layer's value with a higher one's; by default the higher wins."""
        return higher

    def finish(self, value: Any) -> Any:
        """Turn the layered value into the model's field value."""
        return value

    def show(self, value: Any) -> str:
        """Display a value (a default) in help text."""
        return str(value)


class IntRange(Kind):
    metavar = "N"

    def __init__(self, lo: int, hi: int, note: str = "") -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer {lo}..{hi}" + (f" ({note})" if note else "")

    def check(self, value: int, shown: object, key: str) -> int:
        if not self.lo <= value <= self.hi:
            raise ConfigError(key, shown, self.allowed)
        return value

    def from_toml(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, self.allowed)
        return self.check(value, value, key)

    def from_text(self, text: str, key: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            raise ConfigError(key, text, self.allowed) from None
        return self.check(number, text, key)


class FloatRange(Kind):
    metavar = "SECONDS"

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"a number of seconds {lo}..{hi}"

    def check(self, value: float, shown: object, key: str) -> float:
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise ConfigError(key, shown, self.allowed)
        return value

    def from_toml(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, self.allowed)
        return self.check(float(value), value, key)

    def from_text(self, text: str, key: str) -> float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ConfigError(key, text, self.allowed) from None
        return self.check(number, text, key)


class Choice(Kind):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.metavar = "{" + ",".join(choices) + "}"
        self.allowed = "one of " + ", ".join(choices)

    def from_text(self, text: str, key: str) -> str:
        value = text.strip().lower()
        if value not in self.choices:
            raise ConfigError(key, text, self.allowed)
        return value


class DomainName(Kind):
    """A DNS name, '.' for the root; stored in the text form with a trailing dot."""

    metavar = "NAME"
    allowed = "a DNS name such as '.' or 'health.example.com.'"

    def from_text(self, text: str, key: str) -> str:
        if text.strip() in (".", ""):
            if not text.strip():
                raise ConfigError(key, text, self.allowed)
            return "."
        return normalize_zone_name(text, key) + "."

    def show(self, value: Any) -> str:
        return str(value)


class ItemList(Kind, Generic[T]):
    """A non-empty list of distinct items, each read by ``parse_item(text, key)``.

    TOML: a list of strings; text (env var, flag): comma-separated, blank items skipped (so a
    trailing comma is harmless). One kind for every list setting, so they all agree on the
    form, on duplicates and on the messages naming the key the operator wrote.
    """

    def __init__(
        self, parse_item: Callable[[str, str], T], *, metavar: str, allowed: str, empty: str
    ) -> None:
        self.parse_item = parse_item
        self.metavar = metavar
        self.allowed = allowed
        self.empty = empty  # the message for a list with no items

    def parse_items(self, items: Sequence[str], shown: object, key: str) -> tuple[T, ...]:
        result: list[T] = []
        for item in items:
            value = self.parse_item(item, key)
            if value in result:
                raise ConfigError(key, item, f"{value} is listed twice")
            result.append(value)
        if not result:
            raise ConfigError(key, shown, self.empty)
        return tuple(result)

    def from_toml(self, value: object, key: str) -> tuple[T, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, value, self.allowed)
        return self.parse_items(value, value, key)

    def from_text(self, text: str, key: str) -> tuple[T, ...]:
        items = [item for item in text.split(",") if item.strip()]
        return self.parse_items(items, text, key)

    def show(self, value: Any) -> str:
        return ",".join(str(item) for item in value)


class AddressList(ItemList[HostPort]):
    """Addresses with optional ports (listen, upstreams); an upstream cannot be a wildcard."""

    def __init__(self, default_port: int, *, upstream: bool) -> None:
        self.default_port = default_port
        self.upstream = upstream
        example = '["10.0.0.2", "[fd00::2]:53"]' if upstream else '["127.0.0.1:53", "[::1]:53"]'
        super().__init__(
            self.parse_address,
            metavar="HOST[:PORT]" if upstream else "HOST:PORT",
            allowed="a list of IP addresses with optional ports, e.g. " + example,
            empty="at least one address is needed",
        )

    def parse_address(self, text: str, key: str) -> HostPort:
        hp = parse_hostport(text, self.default_port, key)
        if self.upstream and is_wildcard(hp.host):
            raise ConfigError(key, text, "an upstream cannot be an unspecified address")
        return hp


NETWORKS_ALLOWED = (
    'a list of networks such as ["10.0.0.0/8", "fd00::/8", "127.0.0.1"]; '
    '["0.0.0.0/0", "::/0"] allows everyone'
)


def parse_network(item: str, key: str) -> IpNetwork:
    """A network in CIDR form, a bare address being one host. Host bits set are an error that
    names the network probably meant: 10.0.0.1/8 is more likely a typo than 10.0.0.0/8."""
    text = item.strip()
    with contextlib.suppress(ValueError):
        return ipaddress.ip_network(text)
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(key, item, NETWORKS_ALLOWED) from None
    raise ConfigError(key, item, f"host bits are set (did you mean {loose}?)")


class NetworkList(ItemList[IpNetwork]):
    """Client networks (allow)."""

    def __init__(self) -> None:
        super().__init__(
            parse_network,
            metavar="CIDR",
            allowed=NETWORKS_ALLOWED,
            empty="at least one network is needed; " + NETWORKS_ALLOWED,
        )


class Address(Kind):
    """One address with a port; the port defaults to `default_port`."""

    metavar = "HOST:PORT"

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port
        self.allowed = f"an IP address with an optional port (default {default_port})"

    def from_text(self, text: str, key: str) -> HostPort:
        return parse_hostport(text, self.default_port, key)


class Bool(Kind):
    """true/false (TOML booleans; in text also 1/0, yes/no, on/off); a bare flag means true."""

    metavar = "BOOL"
    allowed = "true or false"
    nargs = "?"
    const = "true"
    words: ClassVar[dict[str, bool]] = {
        **dict.fromkeys(("true", "1", "yes", "on"), True),
        **dict.fromkeys(("false", "0", "no", "off"), False),
    }

    def from_toml(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, self.allowed)
        return value

    def from_text(self, text: str, key: str) -> bool:
        value = self.words.get(text.strip().lower())
        if value is None:
            raise ConfigError(key, text, self.allowed)
        return value

    def show(self, value: Any) -> str:
        return "true" if value else "false"


class FilePath(Kind):
    """An absolute file path (not checked for existence here)."""

    metavar = "PATH"
    allowed = "an absolute path, e.g. /etc/resolv.conf"

    def from_text(self, text: str, key: str) -> str:
        path = text.strip()
        if not path.startswith("/") or "\0" in path:
            raise ConfigError(key, text, self.allowed)
        return path
