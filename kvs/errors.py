"""The one exception tree of kvs.

Low-level failures (PySyncObj error codes, socket errors, timeouts) are
translated into these once, at the boundary where they happen (`kvs.raft.group`,
`kvs.routing.peers`). The HTTP layer maps them to status codes in a single error
handler (`kvs.http.public`). Business outcomes such as "key does not exist" are not
exceptions: they are values returned by the state machine.
"""


class KvsError(Exception):
    """Root of every error kvs raises on purpose."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(KvsError):
    """The request is malformed (bad JSON, missing or ill-typed fields)."""

    status = 400


class Unauthorized(KvsError):
    """A node-to-node request lacks a valid signature for the cluster secret."""

    status = 401


class NotFound(KvsError):
    """An administrative object (a shard id) does not exist."""

    status = 404


class Conflict(KvsError):
    """Another operation that excludes this one is running (a view change)."""

    status = 409


class PayloadTooLarge(KvsError):
    """The request body exceeds the documented limit."""

    status = 413


class Unavailable(KvsError):
    """The group that owns the request cannot answer in time (no leader, no majority).

    The outcome of a write that ended in Unavailable is unknown: it may still be
    applied later. Retrying with the same request id is safe (deduplication).
    """

    status = 503


class ReplicaHalted(Unavailable):
    """This node's replica of the group halted (its journal failed: a full disk); its others may serve."""


class NotMember(Unavailable):
    """This node is idle: it is not part of any configuration yet."""


class WrongGroup(KvsError):
    """The receiving group does not own the key at the caller's configuration epoch.

    Retryable: the caller refreshes its configuration and routes again.
    """

    status = 421

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch
