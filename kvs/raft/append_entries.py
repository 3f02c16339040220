"""A follower's AppendEntries, screened before PySyncObj's handler sees it: truncate only on a conflict.

PySyncObj 0.3.17 (`SyncObj.__onMessageReceived`, the `append_entries` branch)
deletes every entry after `prevLogIdx` whenever the follower's log is longer,
reversing the membership changes among them, and then appends the message's
entries, even when the follower already holds exactly those entries and has
acknowledged more. A late or duplicated AppendEntries (a batch overtaken by
the next one, a retransmission, a nextIndex set back after a reconnect) thus
made a follower drop entries it had acknowledged, which the leader may have
counted toward a commit; a kill between the deletion and the re-append lost
them. Raft (Figure 2, AppendEntries, rules 3 and 4) says instead: if an
existing entry conflicts with a new one (same index, different term), delete
it and all that follow; append any new entries not already in the log.

`screen` turns the message into one whose processing by PySyncObj is that
rule, so PySyncObj keeps doing everything else (term, leader, election timer,
membership changes of the entries it appends, the answer):

* The entries the follower already holds (same index and term: by Raft's Log
  Matching property, the same entries) are skipped: `prevLogIdx` moves past
  them. What is left starts at the first real conflict, where PySyncObj's
  truncation is Raft's, or beyond the follower's log, where it truncates
  nothing.
* If every entry matched and the follower's log goes on beyond them, any
  message PySyncObj accepts with a `prevLogIdx` would truncate that suffix
  (and reverse its membership changes). The message goes to PySyncObj without
  `prevLogIdx` then: its handler does the part common to every AppendEntries
  (term, leader, election deadline, commit index) and touches no entry, and
  the replica answers success itself with `answer` = the last index this
  message verified + 1, as PySyncObj would have. Keeping the suffix is what
  Raft does; it is checked again by the next message that reaches it.
  (Making `__deleteEntriesFrom` a no-op under a flag would not do: the
  handler reverses the suffix's membership changes before it calls it, and
  logs a false "truncating already-applied entries" on the way.)
* `commit_index` is capped at the last index the message verified: PySyncObj
  commits `min(leaderCommit, last local index)`, which counted the kept,
  unverified suffix (maybe an old term's entries the leader has replaced).
  Raft's rule is min(leaderCommit, index of last new entry).

A message PySyncObj will refuse (missing or different previous entry, older
term) or cannot parse goes through unchanged: its handling stays PySyncObj's.
`screen` is pure: no I/O, nothing raised for any input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Screened:
    """What to hand PySyncObj's handler, and whether the replica must answer the leader itself."""

    message: dict
    answer: int | None = None       # set: answer success with this next_node_idx after the handler ran


def complete_transmission(finish: dict, received: Any, loads: Callable[[bytes], Any]) -> dict | None:
    """The regular AppendEntries a `transmission: finish` chunk completes (one entry too large for a
    batch, sent in chunks after a `start` and any `process`), or None if it cannot be decoded (PySyncObj
    then meets the same error it always did). The caller resets PySyncObj's reassembly buffer."""
    try:
        entry = loads(received + finish["data"])
    except Exception:            # anything the bytes hold; PySyncObj's own decoding will report it
        return None
    regular = {k: v for k, v in finish.items() if k not in ("transmission", "data")}
    regular["entries"] = [entry]
    return regular


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(message: dict) -> bool:
    prev, entries = message.get("prevLogIdx"), message.get("entries", [])
    if not (_is_index(prev) and _is_index(message.get("commit_index")) and isinstance(entries, (list, tuple))):
        return False
    for offset, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and entry[1] == prev + 1 + offset
                and _is_index(entry[2])):
            return False
    return True


def screen(message: dict, entries_from: Callable[[int], list]) -> Screened:
    """Screen an AppendEntries with `prevLogIdx` (not a `start`/`process`/`finish` chunk: complete a
    `finish` first) that PySyncObj will accept (its term is current). `entries_from(index)` is the
    follower's log from `index` on (PySyncObj's `__getEntries`), [] when `index` is not in it."""
    if "transmission" in message or not _well_formed(message):
        return Screened(message)
    prev, prev_term, entries = message["prevLogIdx"], message.get("prevLogTerm"), list(message.get("entries", []))
    local = entries_from(prev)
    if not local or local[0][2] != prev_term:
        return Screened(message)                     # PySyncObj answers "reset": the leader goes back
    matched = 0          # indexes line up (both consecutive from prev); same term = same entry (Log Matching)
    while matched < len(entries) and matched + 1 < len(local) and local[matched + 1][2] == entries[matched][2]:
        matched += 1
    verified = prev + len(entries)                   # the message proves the log up to here, no further
    commit = min(message["commit_index"], verified)
    if matched == len(entries) and len(local) - 1 > matched:
        # Nothing to write, a longer log: no prevLogIdx, so PySyncObj's handler truncates nothing.
        common = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
        common["commit_index"] = commit
        return Screened(common, answer=verified + 1)
    if matched == 0 and commit == message["commit_index"]:
        return Screened(message)
    return Screened({**message, "prevLogIdx": prev + matched,
                     "prevLogTerm": entries[matched - 1][2] if matched else prev_term,
                     "entries": entries[matched:], "commit_index": commit})
