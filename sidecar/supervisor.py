"""The parent process of ``--workers N``: pass SIGTERM/SIGINT/SIGHUP on to the workers, wait
for them, and if one exits with an error stop the others and exit with that code.

The workers are forked by ``sidecar.app.supervise`` after every module is imported, so they
share those pages copy-on-write. The parent then has nothing left to do but wait, yet it would
keep the whole interpreter state it forked them from (about 29 MiB of RSS, counted again in
every `ps`/`VmRSS` total). So it replaces itself (``execv``, same PID, the workers stay its
children) with a bare interpreter running this file as a script (``python -I -S``: no site,
nothing from the environment), about 10 MiB. Only a few small modules of the standard library
are imported at the top (not even ``typing``): ``sidecar.logs`` is imported the day a worker fails.

Signals sent to the parent between the forks and the new program's handlers are not lost: they
are blocked before the first fork (each worker unblocks them at once), the mask and whatever is
pending survive ``execv``, and ``supervise`` unblocks them only after its handlers are in place.
If the interpreter cannot be executed the same loop runs in the original process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LogError = Callable[[str, dict[str, object]], None]


def supervise(children: Sequence[int], log_error: LogError) -> int:
    """Forward FORWARDED signals to `children` and wait for them all; the exit code."""

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # what came meanwhile arrives now
    exit_code = 0
    running = set(children)
    while running:
        pid, status = os.wait()
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # killed by a signal: report it the way a shell does
            code = 128 - code
        if code != 0 and exit_code == 0:
            exit_code = code
            log_error("a worker failed; stopping the others", {"pid": pid, "exit_code": code})
            forward(signal.SIGTERM, None)
    return exit_code


def lean_command(children: Sequence[int], log_format: str, log_level: str) -> list[str] | None:
    """The command line of the lean parent, or None when this interpreter cannot run it."""
    script = os.path.abspath(__file__)
    executable = sys.executable
    if not executable or not os.access(executable, os.X_OK) or not os.path.isfile(script):
        return None
    root = os.path.dirname(os.path.dirname(script))  # where the `sidecar` package is
    return [
        executable,
        "-I",
        "-S",
        script,
        root,
        log_format,
        log_level,
        *(str(pid) for pid in children),
    ]


def become_lean(children: Sequence[int], log_format: str, log_level: str) -> None:
    """Replace this process with the lean parent; returns only if that is not possible."""
    command = lean_command(children, log_format, log_level)
    if command is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(command[0], command)
    except OSError:
        return


def main(argv: Sequence[str]) -> int:
    """``python -I -S supervisor.py ROOT LOG_FORMAT LOG_LEVEL PID...``"""
    root, log_format, log_level, *pids = argv

    def log_error(message: str, fields: dict[str, object]) -> None:
        try:
            sys.path.insert(0, root)
            from sidecar import logs  # lazy: a healthy sidecar never needs logging here

            logs.setup(log_format, log_level).error(message, extra={"fields": fields})
        except Exception:  # whatever happens, the other workers must still be stopped
            print(f"error   {message} {fields}", file=sys.stderr, flush=True)

    return supervise([int(pid) for pid in pids], log_error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
