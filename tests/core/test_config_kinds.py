"""The value kinds on their own: the one generic list kind behind every list setting."""

from __future__ import annotations

import ipaddress

import pytest

from sidecar.addresses import HostPort
from sidecar.config.kinds import AddressList, ItemList, NetworkList
from sidecar.errors import ConfigError


def parse_word(text: str, key: str) -> str:
    """A toy item parser: a lowercase word, or a ConfigError naming the key."""
    word = text.strip()
    if not word.isalpha():
        raise ConfigError(key, text, "a word")
    return word.lower()


WORDS = ItemList(parse_word, metavar="WORD", allowed="a list of words", empty="no words")


def test_toml_and_text_forms_agree() -> None:
    assert WORDS.from_toml(["a", "B", "c"], "words") == ("a", "b", "c")
    assert WORDS.from_text("a, B,c", "DNS_SIDECAR_WORDS") == ("a", "b", "c")
    assert WORDS.from_text("a,,b,", "--word") == ("a", "b")  # blank items are skipped
    assert WORDS.show(("a", "b")) == "a,b"


@pytest.mark.parametrize("value", ["a,b", ["a", 1], 5, {"a": "b"}, None])
def test_toml_needs_a_list_of_strings(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        WORDS.from_toml(value, "words")
    assert (caught.value.key, caught.value.value, caught.value.allowed) == (
        "words",
        value,
        "a list of words",
    )


@pytest.mark.parametrize(
    ("toml", "text", "item"), [(["a", "b", "A"], "a,b,A", "A"), (["x", "x"], "x, x", " x")]
)
def test_duplicates_are_errors_naming_the_repeated_item(
    toml: list[str], text: str, item: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        WORDS.from_toml(toml, "words")
    assert caught.value.key == "words" and caught.value.value == toml[-1]
    assert caught.value.allowed.endswith("is listed twice")
    with pytest.raises(ConfigError) as caught:
        WORDS.from_text(text, "--word")
    assert (caught.value.key, caught.value.value) == ("--word", item)


@pytest.mark.parametrize(("toml", "text"), [([], ""), ([], " , ,")])
def test_an_empty_list_is_an_error(toml: list[str], text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WORDS.from_toml(toml, "words")
    assert (caught.value.key, caught.value.value, caught.value.allowed) == ("words", [], "no words")
    with pytest.raises(ConfigError) as caught:
        WORDS.from_text(text, "DNS_SIDECAR_WORDS")
    assert (caught.value.key, caught.value.value) == ("DNS_SIDECAR_WORDS", text)


def test_a_bad_item_names_the_key_as_written() -> None:
    for key in ("words", "DNS_SIDECAR_WORDS", "--word"):
        with pytest.raises(ConfigError) as caught:
            WORDS.from_text("a,b2,c", key)
        assert (caught.value.key, caught.value.value) == (key, "b2")
    with pytest.raises(ConfigError) as caught:
        WORDS.from_toml(["a", "b2"], "words")
    assert str(caught.value) == "config error: words = 'b2': a word"


def test_addresses_and_networks_are_item_lists() -> None:
    upstreams = AddressList(53, upstream=True)
    assert isinstance(upstreams, ItemList) and isinstance(NetworkList(), ItemList)
    assert upstreams.from_text("10.0.0.2,[fd00::2]:5353", "--upstream") == (
        HostPort("10.0.0.2", 53),
        HostPort("fd00::2", 5353),
    )
    with pytest.raises(ConfigError, match="listed twice"):
        upstreams.from_toml(["10.0.0.2", "10.0.0.2:53"], "upstreams")
    with pytest.raises(ConfigError, match="unspecified address"):
        upstreams.from_text("0.0.0.0", "--upstream")
    listen = AddressList(53, upstream=False)
    assert listen.from_toml(["0.0.0.0"], "listen") == (HostPort("0.0.0.0", 53),)
    with pytest.raises(ConfigError, match="at least one address is needed"):
        listen.from_toml([], "listen")

    networks = NetworkList()
    assert networks.from_toml(["10.0.0.0/8", "::1"], "allow") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    with pytest.raises(ConfigError, match=r"did you mean 10\.0\.0\.0/8\?") as caught:
        networks.from_text("10.0.0.1/8", "DNS_SIDECAR_ALLOW")
    assert caught.value.key == "DNS_SIDECAR_ALLOW"
    with pytest.raises(ConfigError, match="at least one network is needed"):
        networks.from_text(",", "--allow")
    with pytest.raises(ConfigError, match="listed twice"):
        networks.from_text("127.0.0.1,127.0.0.1/32", "--allow")
