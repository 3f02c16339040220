"""What one node hosts: `Node` (kvs.node.node) and the reports it gives of itself (kvs.node.status)."""

from kvs.node.node import Node

__all__ = ["Node"]
