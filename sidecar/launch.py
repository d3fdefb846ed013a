"""The console entry point (`dns-sidecar`, `python -m sidecar`): the collector off for start-up.

Start-up (the imports, the configuration, the resolver, the listeners) makes objects that live
as long as the process: importing the server set off ~55 collections that walked them halfway
for nothing, ~8 ms of a ~130 ms import on the benchmark machine (bench/NOTES.md). So the
collector is off from the first import until `collector.settle()`, which collects once,
freezes what start-up made and turns it back on, a second after the listeners are up and the
loop check is done (collector.SETTLE_AFTER). A command that does not serve (check-config,
healthcheck, status, --help) ends with it off; the supervisor of several workers turns it
back on before it forks them (app.supervise).
"""

from __future__ import annotations

import gc


def main() -> int:
    gc.disable()
    from sidecar.cli import main as cli_main

    return cli_main()
