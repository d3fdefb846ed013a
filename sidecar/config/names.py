"""Names the operator writes: DNS zone names, and the keys and variables that spell settings.

Kept apart from the kinds and the sources because both need them: a zone name is read by
several kinds, and a misspelt key (in a file, a zone table or the environment) is reported the
same way wherever it is found.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.errors import ConfigError

ENV_PREFIX = "DNS_SIDECAR_"


def normalize_zone_name(text: str, key: str) -> str:
    """Lowercase, drop one trailing dot, and check it is a DNS name other than the root."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    allowed = (
        "a DNS name such as 'local' or 'svc.example.com': labels of 1..63 letters, digits, "
        "'-' or '_', at most 253 characters; the root '.' is not a zone (use upstreams)"
    )
    if not name or len(name) > 253:
        raise ConfigError(key, text, allowed)
    for label in name.split("."):
        if not 1 <= len(label) <= 63:
            raise ConfigError(key, text, allowed)
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            raise ConfigError(key, text, allowed)
    return name


def unknown_key(key: str, value: object, known: Sequence[str], hint: str = "") -> ConfigError:
    """The error for a key or ``DNS_SIDECAR_*`` variable that is not a setting: it suggests
    the closest known one, since a typo is far likelier than a missing feature."""
    import difflib  # lazy: only an error needs it

    name = key.rsplit(".", 1)[-1] if not key.startswith(ENV_PREFIX) else key
    close = difflib.get_close_matches(name, known, n=1)
    what = "unknown variable" if key.startswith(ENV_PREFIX) else "unknown key"
    if close:
        return ConfigError(key, value, f"{what} (did you mean {close[0]}?){hint}")
    return ConfigError(key, value, f"{what}; known: {', '.join(known)}{hint}")
