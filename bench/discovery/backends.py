"""The service's backends, run inside the service namespace and driven over stdin.

    python -m bench.discovery.backends --port 8080 ADDR [ADDR ...]

Each address gets a `tests.fakes.backends.Backend` (HTTP, any path, `Connection: close`): a
request is answered after the backend's delay, a dead backend refuses connections (RST).
Prints "ready" once every listener is up, then reads one command per line and answers each
with "ok <command>" once it took effect:

    die ADDR          close the listener and drop open connections
    revive ADDR       listen again
    delay ADDR SECS   answer every request (health checks included) SECS later
    quit              stop everything and exit
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from tests.fakes.backends import Backend


async def serve(hosts: list[str], port: int) -> None:
    backends = {host: Backend(None, host, port) for host in hosts}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        for backend in backends.values():
            await backend.listen()
        print("ready", flush=True)
        while line := (await reader.readline()).decode().strip():
            command, *args = line.split()
            if command == "quit":
                break
            backend = backends[args[0]]
            if command == "die":
                await backend.stop_listening()
            elif command == "revive":
                await backend.listen()
            elif command == "delay":
                backend.delay = float(args[1])
            else:
                raise ValueError(f"unknown command {line!r}")
            print(f"ok {line}", flush=True)
    finally:
        for backend in backends.values():
            await backend.stop_listening()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark backends driven over stdin")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("hosts", nargs="+", metavar="ADDR")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.hosts, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
