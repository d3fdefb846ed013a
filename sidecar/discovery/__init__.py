"""Discovery: the endpoints behind service-discovery answers, their health and latency, and
the shaping of answers by them. Pure parts (endpoints, shaping) and their I/O (probes,
cloudmap) live together, as a CoreDNS plugin keeps its folder."""
