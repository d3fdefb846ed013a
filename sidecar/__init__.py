"""ecs-dns-sidecar: a DNS caching proxy for the tasks of Amazon ECS."""

__version__ = "0.1.0"
