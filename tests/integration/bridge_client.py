"""A container of a bridge-mode task, for tests/integration/test_bridge_daemon.py: run inside
its network namespace, it asks the daemon sidecar for `count` names (A), sent evenly over
`spread` seconds from `start` (time.monotonic(), so every container bursts together): the
cold burst of an application starting. It waits `wait` seconds more for the replies.

Prints one JSON list, one [name, sent, answered, rcode] per name (time.monotonic(), the one
clock of every namespace; answered and rcode are null for a query never answered).

    python -m tests.integration.bridge_client SERVER PREFIX COUNT WAIT START SPREAD
"""

from __future__ import annotations

import json
import random
import select
import socket
import sys
import time

import dns.message
import dns.rcode

SOCKETS = 8  # the queries are spread over a few source ports, as a resolver library would


def main() -> None:
    server, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wait, spread = float(sys.argv[4]), float(sys.argv[6])
    socks = []
    for _ in range(SOCKETS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for every reply of the burst (SO_RCVBUFFORCE: the test runs as root).
        sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)
        sock.connect((server, 53))
        sock.setblocking(False)
        socks.append(sock)
    time.sleep(max(0.0, float(sys.argv[5]) - time.monotonic()))
    names = [f"{prefix}-{number}.burst.example." for number in range(count)]
    queries = [dns.message.make_query(name, "A") for name in names]
    # Distinct IDs, as a resolver library keeps them among its queries in flight: two random
    # ones alike on one socket (a few percent of bursts) made one reply look unanswered here.
    for query, query_id in zip(queries, random.sample(range(1 << 16), len(queries)), strict=True):
        query.id = query_id
    by_id: dict[tuple[int, int], int] = {}
    results: list[list[object]] = [[name, 0.0, None, None] for name in names]
    start = time.monotonic()
    deadline = start + spread + wait
    waiting = len(queries)
    sent = 0
    while waiting and (left := deadline - time.monotonic()) > 0:
        due = start + spread * sent / len(queries)  # the next query's time
        if sent < len(queries) and time.monotonic() >= due:
            which = sent % SOCKETS
            by_id[(which, queries[sent].id)] = sent
            results[sent][1] = time.monotonic()
            socks[which].send(queries[sent].to_wire())
            sent += 1
            continue
        if sent < len(queries):
            left = max(0.0, due - time.monotonic())
        readable, _, _ = select.select(socks, [], [], left)
        for sock in readable:
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                reply = dns.message.from_wire(data)
                number = by_id.get((socks.index(sock), reply.id), -1)
                if number < 0 or not queries[number].is_response(reply):
                    continue
                del by_id[(socks.index(sock), reply.id)]
                results[number][2:] = [time.monotonic(), dns.rcode.to_text(reply.rcode())]
                waiting -= 1
    print(json.dumps(results))


if __name__ == "__main__":
    main()
