"""The cyclic garbage collector's part while serving, kept small: a speed-up, fenced here.

Every miss makes objects that live one upstream round trip (the question, its attempt, the
query on its socket, callbacks), and every answer cached is one `Entry` (core/cache.py) that
lives its TTL. CPython's collector walks what is young when allocations outnumber frees by its
threshold, and everything when the long-lived objects grew by a quarter.

- `untrack(entry)`: a cached entry leaves the collector's sight. Filling a cache, the entries
  were nearly all the objects it tracked (30,100 of 30,140 after 30,000 misses, start-up's
  frozen), and each full collection walked every one of them: 7.5 ms at 30,000 entries (0.1
  ms untracked), longer with more, a pause every query waiting behind it feels.
- `settle()`, once start-up is done (SETTLE_AFTER seconds after the loop check, app.serve):
  start-up's objects frozen (never walked again), the collector turned back on
  (sidecar/launch.py turns it off for start-up), and the young threshold at YOUNG_THRESHOLD
  instead of 700. A burst of 64 misses read in one turn makes ~1,100 objects that live a
  round trip: at 700 nearly every burst set off a young collection that found them alive
  (and moved them on, to be walked again). At 2,000 most are gone first: 2,152 young
  collections per 150,000 misses -> 167, each at most ~0.15 ms (bench/NOTES.md); what a
  young collection walks is what is alive, not the threshold.

Invariants of `untrack`:
- Only objects that cannot be part of a reference cycle are untracked: every reference they
  hold (beside its class) goes to bytes, int, float, bool, None or tuples of those
  (tests/test_collector.py walks each kind of entry). An `Entry` holds its body
  (bytes), two floats, its TTL (int), its TTL offsets (a tuple of ints) and its `Form` (a tuple
  of bytes, ints and bools), and nothing ever stores anything else in its slots.
- Untracking only makes the collector more careful, never less: whatever an untracked object
  refers to counts as referred to from outside, so nothing reachable is freed. Had the first
  rule been broken, a cycle through the object would be kept (a leak), not freed early.
- Reference counting frees an untracked object as any other; CPython's own untrack in its
  deallocation checks first, so untracking earlier is harmless.
- Where `ctypes.pythonapi` is not there (not CPython), `untrack` does nothing: the entries
  stay tracked, as before.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

YOUNG_THRESHOLD = 2000  # the young generation's threshold while serving (CPython's: 700)
# Seconds from the loop check to `settle()`: its one full collection walks everything start-up
# made (~9 ms on the benchmark machine). Run before the listeners' first answers, it delayed
# each of them by that much; a second later, the first answers are out.
SETTLE_AFTER = 1.0


def _untracker() -> Callable[[object], None]:
    pythonapi = getattr(ctypes, "pythonapi", None)
    if pythonapi is None:  # pragma: no cover - CPython has it
        return lambda _obj: None
    function = pythonapi.PyObject_GC_UnTrack
    function.argtypes = [ctypes.py_object]
    function.restype = None
    return function  # type: ignore[no-any-return]


# `untrack(obj)`: obj out of the collector's sight (see the invariants above).
untrack: Callable[[object], None] = _untracker()


def settle() -> None:
    """Once start-up is done: its objects out of every collection from now on (it made them
    to keep: found garbage first), the young threshold raised (see above), and the collector
    on (off during start-up: sidecar/launch.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.enable()
