"""No import circle among the modules of sidecar/, the one architectural rule that import-linter
(`lint-imports`, the contracts in pyproject.toml) cannot state for a whole package at module
level. The graph is grimp's, the library import-linter builds its own graph with.

Imports under `if TYPE_CHECKING:` are counted: such an import still makes one module's code
depend on the other's names (mypy reads it, a reader must know both), and it is the usual way a
circle is hidden rather than removed. A circle shows up as a strongly connected set of modules;
every import inside such a set lies on a circle, and each is listed with the shortest way back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set

import grimp

PACKAGE = "sidecar"


def import_graph() -> dict[str, set[str]]:
    """Module -> the sidecar modules it imports directly (TYPE_CHECKING imports included)."""
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    return {
        module: set(graph.find_modules_directly_imported_by(module))
        for module in sorted(graph.modules)
    }


def strongly_connected(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    members: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        found.append(sorted(members))
    return sorted(found)


def shortest_path(
    edges: Mapping[str, Set[str]], start: str, goal: str, within: Set[str]
) -> list[str]:
    """The shortest import chain from `start` to `goal` through modules of `within`."""
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        following: list[str] = []
        for node in frontier:
            for successor in sorted(edges[node] & within):
                if successor in seen:
                    continue
                previous[successor] = node
                if successor == goal:
                    path = [goal]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1]
                seen.add(successor)
                following.append(successor)
        frontier = following
    raise AssertionError(f"{goal} is not reachable from {start}")


def cycles(edges: Mapping[str, Set[str]]) -> list[tuple[str, ...]]:
    """For every import inside a strongly connected set, the circle it closes: the import and
    the shortest chain back. Rotated to start at the smallest name, duplicates dropped."""
    circles: set[tuple[str, ...]] = set()
    for members in strongly_connected(edges):
        within = set(members)
        for importer in members:
            for imported in sorted(edges[importer] & within):
                ring = [importer, *shortest_path(edges, imported, importer, within)[:-1]]
                first = ring.index(min(ring))
                circles.add(tuple(ring[first:] + ring[:first]))
    return sorted(circles)


def test_cycles_finds_every_circle_and_nothing_else() -> None:
    edges = {
        "a": {"b"},
        "b": {"c", "a"},
        "c": {"a"},
        "d": {"a", "e"},
        "e": {"e2"},
        "e2": set(),
        "s": {"s"},  # a module importing itself is no circle between modules
    }
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert cycles(edges) == [("a", "b"), ("a", "b", "c")]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_circle_in_sidecar() -> None:
    found = cycles(import_graph())
    listing = "\n".join(" -> ".join((*ring, ring[0])) for ring in found)
    assert not found, f"{len(found)} import circle(s) among sidecar modules:\n{listing}"
