"""Change 6 of `kvs.raft.replica`: a member just added to a group counts toward its quorums only once
the entry that added it has committed and it has acknowledged that entry as a member.

PySyncObj applies a configuration entry when it is appended: from then on the leader counts the new
member in every majority, its votes and its (missing) acknowledgements alike. A replica joins as a
learner (change 5) and its node reopens it as a voting member only once it has *applied* the entry
that names it. Counted from the append, that member cannot acknowledge anything until the entry
commits, and the entry needs a majority of the enlarged group: with one old member down, a 3-member
group adding a fourth waited for that old member forever (2 of 4 is no majority), and even with
every old member up the group needed all three of them until the newcomer's node had reopened it.

Here the leader counts a majority of the group *without* the joiner while the joiner does not count
yet, that is until (a) its add entry has committed and (b) it has acknowledged that entry as a
member; from then on PySyncObj's own count (the joiner included) applies. ReadIndex confirmations
(`kvs.raft.read_index`) count the same members.

Only the leader that proposed the add applies the rule, and only in the term it proposed it in (a
follower, or a journal being replayed, records nothing; a new term forgets it). Why that is safe:
within its term, that leader's add is the newest configuration entry of any log that could elect a
later leader (its first change of the term waited for its no-op to commit, as Raft's single-server
rule requires, and it proposes a change only once the previous one is applied; see
`Replica._SyncObj__changeCluster`); any later change it makes itself clears the rule. Let the old group
have n members and M be a majority of them (at least n // 2 + 1). A later leader is elected by a
majority of the old group (a voter that lacks the add) or of the enlarged one (at least
(n + 1) // 2 + 1 of n + 1 members, of whom at least (n + 1) // 2 are old ones): both meet M, since
n // 2 + 1 + (n + 1) // 2 > n, so every entry counted here is known to every later leader, as Raft
requires. The same bound makes a ReadIndex round confirmed by M safe: any competing leader's
majority includes a member of M, who would have refused the round's term. (A joiner recorded by a
follower and honoured after it became leader would not be: the leader before it may have appended a
newer change, a removal, to other logs.)

Leader step-down (PySyncObj's `leaderFallbackTimeout`: a leader that has not heard from a majority
of its members lately steps down) is a liveness heuristic, not a safety rule (reads are confirmed by
ReadIndex): the joiner's grace period, which PySyncObj starts at its add, lasts until it counts, so
the joiner is taken as heard from. With an odd number of old members that is the same as requiring
a majority of them; with an even number one old member fewer suffices (2 of 4, 1 of 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pysyncobj.monotonic import monotonic as pysyncobj_clock


@dataclass(frozen=True)
class Joiner:
    node_id: str        # its Raft address, as the configuration entry names it
    index: int          # the add entry's log index
    term: int           # the term its leader proposed it in: the rule holds in that term only


def joiner_after_change(request: Any, index: int, term: int) -> Joiner | None:
    """The joiner a leader's proposed configuration change leaves behind: the node an `add` entry
    adds, or None after any other change (a removal: the newest configuration entry is then not an
    add, and every member counts)."""
    if not isinstance(request, (tuple, list)) or len(request) < 2 or request[0] != "add":
        return None
    node = request[1]
    node_id = getattr(node, "id", node)
    return Joiner(node_id, index, term) if isinstance(node_id, str) else None


def still_joining(joiner: Joiner | None, commit_index: int, match_index: int) -> bool:
    """The joiner does not count yet: its add entry is uncommitted or it has not acknowledged it."""
    return joiner is not None and (commit_index < joiner.index or match_index < joiner.index)


def majority_commit(commit_index: int, last_index: int, term: int, term_of: Callable[[int], int | None],
                    match_indexes: Iterable[int]) -> int:
    """The commit index a leader of `term` reaches, counting itself and the given members' acknowledged
    indexes (PySyncObj's rule: an entry needs a strict majority, and only an entry of the leader's own
    term is committed by counting; earlier ones commit with it)."""
    matches = list(match_indexes)
    members = len(matches) + 1
    reached = commit_index
    index = commit_index
    while index < last_index:
        index += 1
        if 1 + sum(1 for match in matches if match >= index) <= members / 2:
            break
        if term_of(index) == term:
            reached = index
    return reached


class JoinerQuorum:
    """The leader side of change 6 for one Replica; every method runs on its tick thread."""

    def __init__(self, raft: Any):
        self._raft = raft
        self.joiner: Joiner | None = None
        self._hidden: tuple[Any, int] | None = None

    def on_proposed(self, request: Any, index: int) -> None:
        """This leader has just accepted a configuration change for its log, at `index`."""
        self.joiner = joiner_after_change(request, index, self._raft.raftCurrentTerm)

    def forget(self) -> None:
        """A new term, or the member set replaced wholesale (a snapshot loaded): nobody is joining."""
        self.joiner = None

    def excluded(self) -> Any | None:
        """On the leader: the member object that does not count yet, or None."""
        raft = self._raft
        if self.joiner is None:
            return None
        if not raft._isLeader() or raft.raftCurrentTerm != self.joiner.term:
            self.joiner = None          # only its proposer, in that term (see the module docstring)
            return None
        node = next((n for n in raft._SyncObj__otherNodes if n.id == self.joiner.node_id), None)
        match = raft._SyncObj__raftMatchIndex
        if node is None or not still_joining(self.joiner, raft.raftCommitIndex, match.get(node, 0)):
            self.joiner = None          # it counts (or is gone): PySyncObj's own count from now on
            return None
        return node

    def counted(self) -> list[Any]:
        """The other members whose acknowledgements count now (all of them but a joiner)."""
        excluded = self.excluded()
        return [n for n in self._raft._SyncObj__otherNodes if n is not excluded]

    def commit_before_tick(self) -> None:
        """Advance the leader's commit index counting without the joiner, then hide the joiner's
        acknowledgements from PySyncObj's own count in the tick that follows (`restore` gives them
        back): that count, which has the joiner in its majority, then reaches no further."""
        node = self.excluded()
        if node is None:
            return
        raft = self._raft
        match = raft._SyncObj__raftMatchIndex
        others = [match.get(n, 0) for n in raft._SyncObj__otherNodes if n is not node]

        def term_of(index: int) -> int | None:
            entries = raft._SyncObj__getEntries(index, 1)
            return entries[0][2] if entries else None

        commit = majority_commit(raft.raftCommitIndex, raft._SyncObj__getCurrentLogIndex(),
                                 raft.raftCurrentTerm, term_of, others)
        if commit != raft.raftCommitIndex:
            raft._SyncObj__raftCommitIndex = commit
            raft._SyncObj__raftLog.setRaftCommitIndex(commit)
        self._hidden = (node, match.get(node, 0))
        match[node] = 0
        # PySyncObj's leader steps down when it has not heard from a majority of its members lately,
        # and gives a new member a grace period from its add on: extend the grace until the joiner
        # counts (see "Leader step-down" above).
        raft._SyncObj__lastResponseTime[node] = pysyncobj_clock()   # the clock its step-down check reads

    def restore(self) -> None:
        """Give the joiner's acknowledged index back (before the tick's poll, where new answers come)."""
        if self._hidden is None:
            return
        node, index = self._hidden
        self._hidden = None
        match = self._raft._SyncObj__raftMatchIndex
        if node in match:
            match[node] = max(index, match[node])
