"""kvs: a sharded, replicated key-value store on PySyncObj Raft groups."""

__version__ = "0.1.0"
