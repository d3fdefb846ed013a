"""How many log lines of one kind are written: the first `per_window` of each kind in a window
of `window` seconds (opened by the kind's first line); the rest are only counted, and one
summary per kind says how many were left out once the window is over.

Thousands of endpoints can change health at once (a deployment, an AZ outage, a Cloud Map
refresh); a line each flooded the log (9.6k lines in 2 s). Sans-IO: the caller passes `now`
and writes the lines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Window:
    start: float
    written: int = 0
    held: int = 0


class LineBudget:
    def __init__(self, per_window: int, window: float) -> None:
        self.per_window = per_window
        self.window = window
        self._windows: dict[str, _Window] = {}

    def ended(self, now: float) -> list[tuple[str, int]]:
        """Close the windows that are over; (kind, lines left out) for those that held any.
        Call it before admit() so that no count is lost when a kind's window reopens."""
        over = [kind for kind, w in self._windows.items() if now - w.start >= self.window]
        held = [(kind, self._windows.pop(kind).held) for kind in over]
        return [(kind, count) for kind, count in held if count]

    def admit(self, kind: str, now: float) -> bool:
        """True: write this line. False: it is counted for the kind's summary."""
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.window:
            window = self._windows[kind] = _Window(now)
        if window.written < self.per_window:
            window.written += 1
            return True
        window.held += 1
        return False
