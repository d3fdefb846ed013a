"""A small flat hierarchy of what can go wrong, kept apart by whose fault it is.

- ConfigError: the operator's configuration is wrong (exit 2 at start).
- FormError: a client sent bytes we cannot read as a DNS query.
- UpstreamError and its kinds: the upstream did not give a usable answer (or, for
  PacketBudgetSpent, was not asked: the sidecar's own packet budget was spent).
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
    """The upstream did not answer usefully; `reason` is a bounded label for metrics.

    When it ends a question (the forwarder's outcome), it is the last failure of that
    question, and `timed_out_only` says whether every attempt of it timed out (no upstream
    reached) rather than failing in some other way."""

    reason = "network"
    timed_out_only = False


class UpstreamTimeout(UpstreamError):
    reason = "timeout"
    timed_out_only = True


class PacketBudgetSpent(UpstreamError):
    """No packet was sent: the upstream packet budget (core/packet_budget.py) had no token
    left. No fault of any upstream's: not counted against one, nor remembered as a failure."""

    reason = "budget"


class UpstreamUnreachable(UpstreamError):
    """ICMP port unreachable, or a TCP connection refused: nothing listens there."""

    reason = "unreachable"


class BadUpstreamReply(UpstreamError):
    """A reply that matched our query but cannot be read."""

    reason = "unreadable"


# The reasons of an upstream's reply codes that are no usable answer (anything but NOERROR and
# NXDOMAIN); any other code is "rcode".
RCODE_REASONS = {1: "formerr", 2: "servfail", 4: "notimp", 5: "refused", 9: "notauth"}


class UpstreamRcode(UpstreamError):
    """The upstream answered with a reply code that is no answer (SERVFAIL, REFUSED, ...)."""

    def __init__(self, rcode: int, message: str) -> None:
        super().__init__(message)
        self.rcode = rcode
        self.reason = RCODE_REASONS.get(rcode, "rcode")
