"""The contract every replicated state machine of kvs follows, and its command dispatch.

`apply(command) -> result` is a pure function of the state and the command:
no clock, no randomness, no I/O, and it never raises (PySyncObj re-applies a
raising entry on every tick and the whole group stops). A command is a tuple
whose first element names the operation; an unknown or malformed command
yields an `Invalid` result, identically on every replica.

`("batch", [command, ...])` applies each command in order and returns the list
of their results: one log entry carries every write that arrived together
(kvs.raft.batching), and one refused command refuses only itself.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Invalid(NamedTuple):
    reason: str


class StateMachine:
    """Dispatches command tuples to the handlers a subclass registers in `_handlers`."""

    _handlers: dict[str, Callable[..., Any]]
    # True when what `snapshot()` returns is never mutated by later applies (copies, immutable values):
    # the Raft layer may then pickle it on another thread while the group goes on (kvs.raft.storage).
    detached_snapshot = False

    def apply(self, command: Any) -> Any:
        if isinstance(command, tuple) and command and command[0] == "batch":
            if len(command) != 2 or not isinstance(command[1], (list, tuple)):
                return Invalid("malformed 'batch' command")
            return [self._apply_one(c) for c in command[1]]
        return self._apply_one(command)

    def _apply_one(self, command: Any) -> Any:
        if not isinstance(command, tuple) or not command:
            return Invalid("command is not a non-empty tuple")
        handler = self._handlers.get(command[0])
        if handler is None:
            return Invalid(f"unknown command {command[0]!r}")
        try:
            return handler(*command[1:])
        except Exception:           # any malformed input, alike on every replica: never a stuck group
            return Invalid(f"malformed {command[0]!r} command")

    def snapshot(self) -> Any:
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        raise NotImplementedError
