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

* A message whose previous entry the follower lacks or holds with another
  term is refused, as PySyncObj would, but the answer is the replica's
  (`Screened.refused`, `refusal_hint`): PySyncObj told the leader to go back
  one entry, or to the follower's end, and its leader takes the last such
  answer. While it sends more (every tick that adds an entry), the answers
  to those later messages undid each step back, so a follower with a long
  tail of an old leader's entries was never repaired; when its group needed
  it for a majority (soak seed 33: the third replica down), the group took no
  write and no read for 14 s. The hint now skips the conflicting term's whole
  run, down to the follower's commit index (committed entries are the
  leader's too), and until a message matches again the follower never
  answers a later one with a higher hint, so the last answer the leader
  takes is the lowest. Any hint is safe: nextIndex decides only what is sent
  next, and matching entries sent again are skipped (above); one too low
  costs a resend, or a snapshot if the leader compacted past it.

A message PySyncObj will refuse for its term, or cannot parse, goes through
unchanged: its handling stays PySyncObj's. `screen` and `refusal_hint` are
pure: no I/O, nothing raised for any input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Screened:
    """What to hand PySyncObj's handler, and whether the replica must answer the leader itself."""

    message: dict
    answer: int | None = None       # set: answer success with this next_node_idx after the handler ran
    refused: bool = False           # set: answer "reset" (refusal_hint) after the handler ran


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
        # Without prevLogIdx PySyncObj does only the term, leader and timer part; a commit index of 0
        # commits nothing (the message verified no entry), and the replica answers the refusal.
        common = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
        return Screened({**common, "commit_index": 0}, refused=True)
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


def refusal_hint(prev: int, first: int, last: int, commit: int, term_at: Callable[[int], Any],
                 lower: int | None) -> int:
    """The nextIndex a follower whose log runs from `first` to `last` asks for after refusing a message
    whose previous entry `prev` it lacks or holds with another term: past its end, its end + 1; in its log,
    the first index of the run of its term at `prev` (terms never decrease along a log); never more than
    `lower`, its last refusal's hint to this leader in this term if no message matched since; never at or
    below its commit index or `first` (the entry its snapshot ends at): committed entries are the leader's."""
    floor = max(first, min(commit, last)) + 1
    if prev > last:
        hint = last + 1
    elif prev < floor:
        hint = floor
    else:
        term, low, high = term_at(prev), floor, prev
        while low < high:
            middle = (low + high) // 2
            if term_at(middle) < term:
                low = middle + 1
            else:
                high = middle
        hint = low
    if lower is not None:
        hint = min(hint, lower)
    return max(hint, floor)
