"""The collector's part while serving (sidecar/collector.py): cached entries out of its sight,
holding nothing that could close a cycle; start-up frozen and the young threshold raised."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
from dnslib import EDNS0, QTYPE, RR, SOA, A, DNSRecord

from sidecar import collector
from sidecar.core import wire
from sidecar.core.cache import Entry
from tests.fakes.scripted_exchanges import Step, reply_to
from tests.fresh_python import run_python
from tests.test_pipeline import FIRST, Path, run, stored

ATOMS = (bytes, int, float, bool, type(None))


def held(obj: object) -> Iterator[object]:
    """Everything `obj` refers to, through tuples, depth first (not its class, which every
    object refers to and which lives as long as the module)."""
    for value in gc.get_referents(obj):
        if value is type(obj):
            continue
        yield value
        if isinstance(value, tuple):
            yield from held(value)


def entries_of(p: Path) -> list[Entry]:
    return list(p.resolver.cache._entries.values())


def test_a_cached_entry_is_untracked_and_answers_as_before() -> None:
    async def test() -> None:
        p = Path()
        p.transport.add(FIRST, Step(reply_to("a.example", ttl=60)))
        first, source = await p.ask("a.example")
        await stored(p, "a.example")
        (entry,) = entries_of(p)
        assert not gc.is_tracked(entry)
        again, again_source = await p.ask("a.example", qid=2)
        assert (source, again_source) == ("upstream", "cache")
        assert again.rr == first.rr

    run(test)


@pytest.mark.parametrize(
    ("reply", "negative"),
    [
        pytest.param(
            lambda r: r.add_answer(RR("a.example", rdata=A("192.0.2.1"), ttl=60)),
            False,
            id="one",
        ),
        pytest.param(
            lambda r: [
                r.add_answer(RR("a.example", rdata=A(f"192.0.2.{i}"), ttl=60 + i))
                for i in range(1, 9)
            ],
            False,
            id="eight",
        ),
        pytest.param(
            lambda r: r.add_auth(
                RR("example", QTYPE.SOA, rdata=SOA("ns", "admin", (1, 2, 3, 4, 30)), ttl=300)
            ),
            True,
            id="negative",
        ),
    ],
)
def test_an_entry_holds_only_what_cannot_refer_back(
    reply: Callable[[DNSRecord], object], negative: bool
) -> None:
    """collector.py's first invariant, on each kind of entry the cache makes."""
    record = DNSRecord.question("a.example").reply()
    reply(record)
    record.add_ar(EDNS0(udp_len=1232))
    msg = bytes(record.pack())
    entry = Entry(msg, wire.parse_reply(msg), 60, 160.0, negative, True, True, 10, False)
    kinds = {type(value) for value in held(entry)}
    assert kinds, "nothing held: the walk is broken"
    for kind in kinds:
        assert issubclass(kind, (*ATOMS, tuple)), kind


def test_settle_freezes_start_up_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.disable()  # as sidecar/launch.py leaves it for start-up
        made = [[] for _ in range(100)]  # start-up's objects, as far as this test goes
        collector.settle()
        assert gc.isenabled()
        assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, *before[1:])
        walked = {id(obj) for obj in gc.get_objects()}  # what collections still walk
        assert not any(id(obj) in walked for obj in made)
        later: list[int] = []
        assert id(later) in {id(obj) for obj in gc.get_objects()}
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    "start",
    [
        "from importlib.metadata import entry_points\n"
        "entry_points(group='console_scripts')['dns-sidecar'].load()()",
        "import runpy; runpy.run_module('sidecar', run_name='__main__')",
    ],
    ids=["dns-sidecar", "python -m sidecar"],
)
def test_the_entry_points_run_start_up_with_the_collector_off(start: str) -> None:
    # The CLI replaced by a probe that tells the collector's state when start-up would begin.
    probe = (
        "import gc, sys, sidecar.cli\n"
        "sidecar.cli.main = lambda: print('collector on:', gc.isenabled()) or 0\n"
    )
    assert run_python(probe + start) == "collector on: False"


def test_serve_settles_a_second_after_the_loop_check_not_before_the_first_answers() -> None:
    # A sidecar served in a fresh interpreter with the collector off (as launch.py starts
    # it), its upstream a loopback port nobody listens on; its state read when it is ready,
    # and again when settle() has run (settle wrapped to report, then end serve()).
    code = """
import asyncio, gc, socket, time
import sidecar.app
from sidecar import collector
from sidecar.config import load

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

gc.disable()
config = load(
    ["--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{free_port()}",
     "--metrics-listen", f"127.0.0.1:{free_port()}", "--attempt-timeout", "0.2"],
    {},
)
ready = []
settle = collector.settle

def settled_then_stop():
    settle()
    on = gc.isenabled() and gc.get_freeze_count() > 0
    print("settled after", round(time.monotonic() - ready[0], 1), on)
    ready[1].loop_found.set()  # ends serve() (as a found loop would)

collector.settle = settled_then_stop

def started(server):
    ready.extend((time.monotonic(), server))
    print("at ready:", gc.isenabled(), gc.get_freeze_count() > 0)

asyncio.run(sidecar.app.serve(config, started=started))
"""
    lines = run_python(code).splitlines()
    assert lines[0] == "at ready: False False"
    seconds = float(lines[1].split()[2])
    assert lines[1].endswith("True")
    assert collector.SETTLE_AFTER - 0.2 <= seconds <= collector.SETTLE_AFTER + 0.3
