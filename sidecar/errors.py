"""A small flat hierarchy of what can go wrong, kept apart by whose fault it is.

- ConfigError: the operator's configuration is wrong (exit 2 at start).
- FormError: a client sent bytes we cannot read as a DNS query.
- UpstreamError and its kinds: the upstream did not give a usable answer.
"""


class ConfigError(Exception):
    """A configuration value is not allowed: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config error: {key} = {value!r}: {allowed}")


class FormError(Exception):
    """A client's message is malformed."""


class UpstreamError(Exception):
    """The upstream did not answer usefully; `reason` is a bounded label for metrics."""

    reason = "network"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"


class UpstreamRefused(UpstreamError):
    reason = "refused"


class BadUpstreamReply(UpstreamError):
    reason = "mismatch"
