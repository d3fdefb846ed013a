"""The discovery-quality benchmark: what an application sees when a backend dies or slows down.

`python -m bench.discovery` (or `make bench-discovery`) runs one timeline against several DNS
setups at once, each in network namespaces of its own, and writes bench/results/discovery.md and
bench/results/discovery.png. See bench/discovery/README.md.
"""
