"""kvs: a sharded, replicated key-value store on PySyncObj Raft groups.

`from kvs import Client` gives the cluster-aware client (`kvs.cluster_client`)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Client", "KeyNotFound", "PreconditionFailed", "Conflict", "BadRequest", "Unauthorized",
                "Unavailable", "KvsError"):
        from kvs import cluster_client          # imported on first use: a node never loads it
        return getattr(cluster_client, name)
    raise AttributeError(f"module 'kvs' has no attribute {name!r}")
