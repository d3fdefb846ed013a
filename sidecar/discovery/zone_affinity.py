"""Zone affinity: first places in discovery answers go to endpoints in the task's own
availability zone, while that zone has enough live endpoints for its share of the load.

The rule (`discovery.zone_affinity = prefer`), with no control plane: each sidecar knows only
its own AZ (ECS task metadata) and each endpoint's (the AVAILABILITY_ZONE attribute ECS puts
on the Cloud Map instances it registers). It assumes the clients are spread over the AZs as
the endpoints are, as ECS spreads the tasks of a service, so the local AZ carries 1/Z of the
load, Z being the number of AZs among the answer's live endpoints.
- Local endpoints are the answer's usable endpoints (not unhealthy) in the local AZ that are
  not latency outliers (shaping weight below OUTLIER_WEIGHT: some 9 ms or more slower than
  the best beyond the slack). With none, the local AZ is skipped: the answer is shaped as
  without affinity.
- L local endpoints of N live ones are enough when L / N >= 1 / Z: the local endpoints then
  take every first place, in proportion to their own weights, and the others follow (they
  are still in the answer, in their weighted order, for clients that try the next address).
- Fewer: the local endpoints take the share p = L x Z / N of first places (what they can
  carry at the fleet's average load per endpoint) and the rest spills over to the other
  endpoints in proportion to their weights.
- Endpoints with no AZ count as another zone's. Without a local AZ, or when no endpoint is in
  it, weights are left as they are.
Plain arithmetic on weights; shaping.py draws the orders from them.
"""

from __future__ import annotations

from collections.abc import Sequence

OUTLIER_WEIGHT = 0.05
# The weight left to other zones' endpoints while the local one takes every first place: they
# keep their order among themselves after the local endpoints, and no first place.
BEHIND = 1e-9


def local_share(local: int, live: int, zones: int) -> float:
    """The share of first places the local AZ takes (see the module's rule)."""
    if local == 0 or live == 0:
        return 0.0
    return min(1.0, local * zones / live)


def affinity_weights(
    weights: Sequence[float], azs: Sequence[str | None], local_az: str | None
) -> list[float]:
    """`weights` of the usable endpoints, in the same order as their `azs`, scaled so that the
    local AZ's endpoints take their share of first places."""
    w = list(weights)
    if local_az is None or not w:
        return w
    local = [i for i, az in enumerate(azs) if az == local_az and w[i] >= OUTLIER_WEIGHT]
    if not local:
        return w  # the local AZ is skipped: all its endpoints dead, or outliers
    zones = len({az for az in azs if az is not None} | ({None} if None in azs else set()))
    share = local_share(len(local), len(w), zones)
    local_set = set(local)
    local_sum = sum(w[i] for i in local)
    other_sum = sum(x for i, x in enumerate(w) if i not in local_set)
    if share >= 1.0 or other_sum <= 0:
        return [x if i in local_set else x * BEHIND for i, x in enumerate(w)]
    scale = share / (1 - share) * other_sum / local_sum
    return [x * scale if i in local_set else x for i, x in enumerate(w)]
