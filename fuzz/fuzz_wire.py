"""Coverage-guided fuzzing of the wire reader with atheris (libFuzzer for Python).

    python fuzz/fuzz_wire.py -max_total_time=20          # make fuzz runs this
    python fuzz/fuzz_wire.py fuzz/corpus -max_total_time=600

Each input is tried as a client query and as an upstream reply, with the same checks as the
hypothesis suite (tests/core/test_fuzz_wire.py): parse_query raises only ClientError,
parse_reply only FormError, and whatever parses can be answered, cached, judged for
bailiwick and rendered. Any other exception is a crash: libFuzzer saves the input as
crash-<hash> in the current directory and exits non-zero.

Those checks run on the modules as the sidecar runs them, compiled with mypyc when they are
(setup.py), where atheris sees no coverage. So the wire reader's Python source is loaded
beside them, instrumented: it guides the fuzzing, and each input must read the same in both
(the same Query or Reply, or the same error), which also finds where compiled code parts
from Python's semantics (docs/architecture.md, "Compiled modules").
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    import sidecar.core.bailiwick
    import sidecar.core.cache
    import sidecar.core.wire

from tests.core.test_fuzz_wire import check_query, check_reply

# The source in this tree, also when the wire module imported is compiled.
WIRE_SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sidecar/core/wire.py"
)


def source_module(path: str, name: str) -> ModuleType:
    """The Python source at `path` as a module of its own, each function instrumented."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for _, function in inspect.getmembers(module, inspect.isfunction):
        if function.__module__ == name:
            atheris.instrument_func(function)
    return module


wire_source = source_module(WIRE_SOURCE, "fuzz_wire_source")


def outcome(read: Callable[[bytes], tuple[object, ...]], data: bytes) -> tuple[object, ...]:
    """What a reader makes of `data`: its tuple, or its error's kind, text and rcode."""
    try:
        return ("read", tuple(read(data)))
    except Exception as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "rcode", None))


def read_alike(data: bytes) -> None:
    """The imported wire reader (compiled or not) and its source read `data` the same."""
    for name in ("parse_query", "parse_reply"):
        ours = outcome(getattr(sidecar.core.wire, name), data)
        source = outcome(getattr(wire_source, name), data)
        if ours != source:
            raise AssertionError(f"{name}: {ours!r} where the source gives {source!r}")


def test_one_input(data: bytes) -> None:
    read_alike(data)
    check_query(data)
    check_reply(data)


def seed(corpus: str) -> None:
    """Put well-formed and hostile messages into an empty corpus directory: libFuzzer mutates
    from there, and reaches the record walker far sooner than from nothing."""
    from dnslib import CNAME, EDNS0, QTYPE, RR, SOA, A, DNSRecord

    from tests.fakes.hostile_traffic import CASES, query

    os.makedirs(corpus, exist_ok=True)
    if os.listdir(corpus):
        return
    seeds = [case.data for case in CASES] + [query(edns=1232), query(qtype=28)]
    reply = DNSRecord.question("www.example.test").reply()
    reply.add_answer(RR("www.example.test", QTYPE.CNAME, rdata=CNAME("a.example.test"), ttl=60))
    reply.add_answer(RR("a.example.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    reply.add_ar(EDNS0(udp_len=1232))
    seeds.append(bytes(reply.pack()))
    negative = DNSRecord.question("gone.example.test").reply()
    negative.header.rcode = 3
    soa = SOA("ns.example.test", "hm.example.test", (1, 60, 60, 60, 30))
    negative.add_auth(RR("example.test", QTYPE.SOA, rdata=soa, ttl=30))
    seeds.append(bytes(negative.pack()))
    for index, data in enumerate(seeds):
        with open(os.path.join(corpus, f"seed-{index:03d}"), "wb") as f:
            f.write(data)


def main() -> None:
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            seed(arg)  # the first corpus directory
            break
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
