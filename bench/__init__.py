"""The benchmark suite: the sidecar next to dnsmasq and Unbound, on loopback, with dnsperf.

`python -m bench.run` (or `make bench`) starts NSD as the authoritative upstream, the servers
under test pinned to one core, dnsperf pinned to the other, and writes bench/results/latest.md
and PNG charts. See bench/README.md.
"""
