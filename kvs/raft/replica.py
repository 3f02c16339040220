"""Replica: PySyncObj's SyncObj driving one pure state machine, with low-latency commits.

PySyncObj 0.3.17 (pinned) commits on timer ticks: a command waits in a queue for the tick thread to
wake (`autoTickPeriod`), then for the next batch of AppendEntries (`appendEntriesPeriod`), so a
write takes ~100 ms with the defaults. Its unbatched mode is fast but makes followers truncate and
rewrite already-acknowledged entries. This subclass keeps batching on and removes the waiting
instead, with six documented changes that touch PySyncObj internals (name-mangled attributes of
SyncObj; re-check them when upgrading):

1. Wake-up: submitting a command writes to a pipe the tick thread polls, so it enters the log at once,
   not at the next tick: the pipe's handler, inside `poll`, appends, sends and fsyncs (`_on_wake`, on a
   leader), and sends a follower's waiting forwards and read requests. A message handler's proposal
   needs none (`submit(from_handler=True)`): the tick right after the handlers appends it.
2. Immediate replication (`kvs.raft.replication`): at the end of every tick, if the leader's log or
   commit index moved since it last sent AppendEntries, it sends them now, one message per follower
   for everything queued in that tick; a commit index that the event loop's requests wait for rides
   on the next AppendEntries instead of a message of its own.
3. No nextIndex regression: on a successful AppendEntries reply PySyncObj sets the follower's
   nextIndex back to the acknowledged position even when newer entries are already in flight, so it
   re-sends them with an older prevLogIndex (the follower then had to skip what it already holds,
   see 4). We keep nextIndex at the furthest point already sent; a follower that really lacks
   entries answers with `reset`, which still works. matchIndex never moves back either: PySyncObj
   raises it only.
4. Truncation only on a real conflict (`kvs.raft.append_entries`): PySyncObj deletes every entry
   after an AppendEntries' prevLogIndex whenever the follower's log is longer, so a late or
   duplicated message made a follower drop entries it had acknowledged. Every `append_entries` of
   the current term is screened before PySyncObj's handler sees it: the entries the follower holds
   are skipped, so PySyncObj truncates at the first entry of another term or not at all; when all
   match and the log goes on, PySyncObj gets the message without prevLogIndex (it then does the
   term, leader, timer and commit part only) and we answer success up to the last verified entry
   ourselves. The commit index a message sets is capped at the last entry it verified, and a
   snapshot chunk commits nothing. A message that does not match is refused by the replica, with a
   hint that skips the conflicting term (down to the commit index) and never rises until a message
   matches: PySyncObj's hints, answering messages sent meanwhile, undid every step back (soak seed
   33).
5. Learners: a replica opened with `learner=True` is PySyncObj's read-only node (no address of its
   own; the members it connects to take it for a read-only peer): it gets the log and snapshots but
   never votes, campaigns or counts toward a commit. A node added to a running group catches up this
   way first (`kvs.reconfig.shard_membership` proposes its membership only once it has), so the
   quorum never waits for a member still receiving the snapshot. Once its applied configuration
   names its own address (`promoted`), its node reopens the directory as a voting replica
   (`kvs.node`). `peers` are the members as its node knows them, `also_connect` the planned nodes (the
   leader may be one, after a hand-over or an election); it stays connected to both whatever the
   entries it replays say (one removing the replica leading now made PySyncObj drop that
   connection, and the learner waited forever). The voter it becomes (`hold_election`) does not
   campaign until it has heard a leader: PySyncObj has no pre-vote, and a replica whose load
   outlasts the election timeout would depose the leader that has just added it.
6. A joiner counts once it has joined (`kvs.raft.joiner`): PySyncObj counts a new member from the
   append of the entry that adds it; here the leader that proposed it counts without it, in that
   term, until that entry has committed and the new member has acknowledged it, so a learner's
   reopening as a voter (which waits for that entry) never holds up the group's quorum. And one
   change at a time: a leader refuses a membership change while its previous one is unapplied
   (PySyncObj checks for that, but never records the index).

The replicated method `_apply` is the only entry to the state machine; it delegates to
`state.apply`, which is pure and never raises.

Reads use the ReadIndex protocol (`kvs.raft.read_index`), and a follower's writes go to its leader
by `kvs.raft.forwarding`: their messages travel on PySyncObj's transport beside its own and are
handled here before PySyncObj sees them; both act on each tick (`read_index` and `forward` wake the
tick thread).

Outgoing Raft connections, one group per address, a sync before acknowledging: `kvs.raft.transport`.

Durability (group commit; see `DurableJournal.sync`): a replica acknowledges only entries that are
on disk, with one fsync per batch. PySyncObj appends without syncing; these hooks sync at the points
where an entry starts to count toward a commit:

- Followers: their only acknowledgement is the `next_node_idx` answer, which PySyncObj sends in one
  place (`__sendNextNodeIdx`, reached from the `append_entries` handler for appended entries, a
  truncation or an installed snapshot, and from change 4's own answer) through `RaftTransport.send`,
  which syncs the journal before any message in `_SYNC_BEFORE_SENDING` leaves: one fsync per
  AppendEntries message (one batch). Votes and vote requests are synced too ("persist, then send";
  term and vote are fsynced by the journal itself): cheap, as elections are rare.
- Before an installed snapshot replaces the journal, the received snapshot file and its directory
  are fsynced (`_SyncObj__loadDumpFile`): the journal is cleared right after, and the
  acknowledgement follows.
- Leader: it counts itself toward a commit in `_onTick`, at the top of the tick. Its entries enter
  the log in two places only: `_checkCommandsToApply` near the end of a tick or in the wake-up's
  handler (client commands, membership changes), and `__onBecomeLeader` (the no-op), reached from
  the `response_vote` handler during `poll` or, in a single-node group, from the election at the top
  of `_onTick` itself, just before the commit count. Hence three syncs: right after `_replicate_now`
  has sent AppendEntries (`_sync_after_replication`, a tick callback and the end of `_on_wake`: the
  leader's fsync runs while the followers do theirs, instead of delaying the next tick); right after
  becoming leader; and at the top of every tick (`_onTick`), which covers anything else written
  since the last sync (a tick that raised half-way, a path added by a later PySyncObj), so a commit
  computed there never counts an unsynced entry of the leader's. A single-node group commits at the
  next tick's top, after that sync.
- Every sync is a no-op when nothing was written since the last one; all run on the tick thread.

Disk faults (a full disk, EIO; see `DurableJournal.failure`): once a write, truncation or fsync of
the journal or its `.meta` has failed, the journal refuses every change and this replica halts:
`_onTick` catches the error (the journal logged it once, CRITICAL; PySyncObj would log a traceback
on every tick, onto the full disk) and from then on every tick only idles, so no heartbeat,
AppendEntries answer, vote or ReadIndex round leaves, and `RaftTransport.send` drops any message
still on its way. The others elect a leader among themselves (this replica can neither campaign nor
vote: it cannot persist a term). `RaftGroup.failure` tells the node, whose supervisor closes the
group and reopens it from disk once the disk takes writes again (`kvs.raft.recovery`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import pysyncobj.pickle
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as pysyncobj_clock
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier

from kvs.raft.append_entries import Screened, complete_transmission, refusal_hint, screen
from kvs.raft.disk import JournalFailure, fsync_file_and_directory
from kvs.raft.forwarding import MESSAGE_TYPES as FORWARDING_MESSAGES, Forwarding
from kvs.raft.joiner import JoinerQuorum
from kvs.raft.read_index import MESSAGE_TYPES as READ_INDEX_MESSAGES, ReadIndex
from kvs.raft.replication import Replication
from kvs.raft.transport import GROUP_FIELD, RaftTransport


log = logging.getLogger(__name__)

class Replica(SyncObj):
    def __init__(self, self_address: str, peers: list[str], state: Any, conf: SyncObjConf,
                 on_applied: Callable[[], None] | None = None, group: str = "", learner: bool = False,
                 also_connect: tuple[str, ...] = (), hold_election: bool = False):
        self.group = group
        self.address = self_address
        self.learner = learner                      # change 5: PySyncObj's read-only node
        self._hold = hold_election                  # change 5: until a leader is heard; before the tick thread
        # change 5: a learner stays connected to every replica it was told of (see _connect_also)
        self._also_connect = [TCPNode(a) for a in (tuple(peers) if learner else ()) + tuple(also_connect)]
        self._foreign_logged = False
        self._refused: tuple[tuple, int] | None = None    # change 4: ((term, leader), hint) of the last refusal
        self._state = state
        self._on_applied = on_applied
        self._replication = Replication(self)       # change 2
        self._wakeup: PipeNotifier | None = None
        self._quiet_thread: int | None = None       # see submit(from_handler=True)
        self._read_index = ReadIndex(self)          # before the tick thread starts: messages may come at once
        self._forwarding = Forwarding(self)
        self._side_messages = {**dict.fromkeys(READ_INDEX_MESSAGES, self._read_index.on_message),
                               **dict.fromkeys(FORWARDING_MESSAGES, self._forwarding.on_message)}
        self._joining = JoinerQuorum(self)          # change 6
        super().__init__(None if learner else self_address, peers, conf, transportClass=RaftTransport)
        self._wakeup = PipeNotifier(self._poller, self._on_wake)
        self.addOnTickCallback(self._joining.restore)            # first: later callbacks see the real indexes
        self.addOnTickCallback(self._replicate_now)
        self.addOnTickCallback(self._sync_after_replication)     # after _replicate_now: see "Durability"
        self.addOnTickCallback(self._read_index.on_tick)
        self.addOnTickCallback(self._forwarding.on_tick)
        if self._also_connect:
            self.addOnTickCallback(self._connect_also)      # on the tick thread, which owns the transport

    @replicated
    def _apply(self, command: Any) -> Any:
        if hasattr(self._state, "log_index"):
            self._state.log_index = self.raftLastApplied + 1     # this entry's index (PySyncObj counts after)
        result = self._state.apply(command)
        if self._on_applied is not None:
            self._on_applied()
        return result

    def submit(self, command: Any, callback: Callable[[Any, int], None], from_handler: bool = False) -> None:
        """Propose `command`; `callback(result, fail_reason)` runs on the tick thread. `from_handler`: by a message
        handler, in `poll`: the tick that follows appends it, so no wake-up is written (or read by a poll)."""
        if not from_handler:
            self._apply(command, callback=callback)
            return
        self._quiet_thread = threading.get_ident()      # written by the thread that ticks only
        try:
            self._apply(command, callback=callback)
        finally:
            self._quiet_thread = None

    def read_index(self, callback: Callable[[bool], None]) -> None:
        """Ask for a linearizable read (kvs.raft.read_index); `callback(ok)` runs on the tick thread once
        this replica's state may be read (True), or when it may not now (False: retry)."""
        self._read_index.request(callback)
        self._wake()

    def forward(self, commands: list, callback: Callable[[list | None], None]) -> None:
        """Have the leader propose `commands` (kvs.raft.forwarding); `callback` runs on the tick thread."""
        self._forwarding.request(commands, callback)
        self._wake()

    def fail_waiting(self) -> None:
        """After the tick thread has ended: every waiting read is told False, every forward None."""
        self._read_index.fail_all()
        self._forwarding.fail_all()

    # -- change 1: wake the tick thread -----------------------------------------

    def _applyCommand(self, command: Any, callback: Any, commandType: Any = None) -> None:
        super()._applyCommand(command, callback, commandType)
        if self._quiet_thread != threading.get_ident():     # another thread's command may come meanwhile
            self._wake()

    def _checkCommandsToApply(self) -> None:
        started = pysyncobj_clock()           # the clock its own limit is read on
        SyncObj._checkCommandsToApply(self)
        if pysyncobj_clock() - started >= self.conf.appendEntriesPeriod:
            self._wake()        # it stopped there with commands left; a handler's proposal wrote no wake-up

    def _wake(self) -> None:
        if self._wakeup is not None:
            try:
                self._wakeup.notify()
            except BlockingIOError:
                pass        # the pipe is full: a wake-up is pending already (a tick thread that lags or halted)

    def _on_wake(self) -> None:
        # Inside `poll`, where message handlers append and send too: what the wake-up is for leaves now,
        # not after the tick it wakes for. Forwards go to the leader; a leader appends proposals, sends
        # them and fsyncs, the three steps that end a tick (see "Durability"). ReadIndex rounds start too.
        self._forwarding.on_tick()
        self._read_index.on_tick()
        if self._isLeader():
            self._checkCommandsToApply()
            self._replicate_now()
            self._sync_after_replication()

    # -- change 2: replicate at the end of the tick (kvs.raft.replication) ------

    def hold_commit_send(self) -> None:     # from a commit callback whose requests the event loop answers
        self._replication.hold()

    def send_held_commit(self) -> None:     # before a follower is told a read index (kvs.raft.read_index)
        self._replication.send_held()

    def _replicate_now(self) -> None:
        self._replication.send()

    # -- change 3: never move nextIndex backwards on success ---------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: dict) -> None:
        sender_group = message.get(GROUP_FIELD)
        if sender_group is not None and sender_group != self.group:
            if not self._foreign_logged:             # once: a stale replica may keep sending for a while
                self._foreign_logged = True
                log.warning("group %s at %s: ignoring Raft messages of group %s from %s (a replica of a group "
                            "this node's peers no longer run there)", self.group, self.selfNode, sender_group, node)
            return
        side = self._side_messages.get(message.get("type"))
        if side is not None:
            side(node, message)         # ReadIndex, forwarded writes: ours alone, PySyncObj never sees them
            return
        if message.get("type") == "append_entries":
            self._on_append_entries(node, message)          # change 4
            return
        furthest_sent = None
        if message.get("type") == "next_node_idx" and message.get("success") and not message.get("reset"):
            furthest_sent = self._SyncObj__raftNextIndex.get(node)
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if furthest_sent is not None:
            next_index = self._SyncObj__raftNextIndex
            if node in next_index and next_index[node] < furthest_sent:
                next_index[node] = furthest_sent

    # -- change 4: a follower truncates only on a real conflict -----------------

    def _on_append_entries(self, node: Any, message: dict) -> None:
        term = message.get("term")
        if not isinstance(term, int) or term < self.raftCurrentTerm:
            # PySyncObj ignores an older term (no answer, no change): nothing to screen, nothing to send.
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            return
        screened = self._screen_append_entries(message)
        SyncObj._SyncObj__onMessageReceived(self, node, screened.message)
        if screened.message is not message and "commit_index" in message:
            # Only the commit decision is capped: PySyncObj's readiness check and status keep the leader's.
            self._SyncObj__leaderCommitIndex = message["commit_index"]
        # Answers PySyncObj did not give (it saw no prevLogIdx) go through RaftTransport.send: synced first.
        if screened.refused:
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=self._refusal_hint(node, message), reset=True)
        elif screened.answer is not None or ("prevLogIdx" in screened.message
                                             and "transmission" not in screened.message):
            self._refused = None                            # a message matched: the next refusal starts afresh
        if screened.answer is not None:
            # Every entry matched and the log goes on.
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=screened.answer, success=True)

    def _refusal_hint(self, node: Any, message: dict) -> int:
        """See `kvs.raft.append_entries.refusal_hint`; remembers it for the leader's next messages."""
        journal = self._SyncObj__raftLog
        first, last = journal[0][1], journal[-1][1]
        leader = (message["term"], getattr(node, "id", node))
        lower = self._refused[1] if self._refused is not None and self._refused[0] == leader else None
        hint = refusal_hint(message["prevLogIdx"], first, last, self.raftCommitIndex,
                            lambda index: journal[index - first][2], lower)
        self._refused = (leader, hint)
        return hint

    def _screen_append_entries(self, message: dict) -> Screened:
        if "prevLogIdx" not in message:
            commit = message.get("commit_index")
            if "serialized" in message and isinstance(commit, int) and commit > self.raftCommitIndex:
                # A snapshot chunk verifies no entry of the log it is about to replace, but PySyncObj
                # would commit up to that log's end. An installed snapshot needs no commit index (it sets
                # last-applied); the next AppendEntries, which verifies entries, moves the commit index.
                return Screened({**message, "commit_index": self.raftCommitIndex})
            return Screened(message)
        if message.get("transmission") == "finish":
            regular = complete_transmission(message, self._SyncObj__recvTransmission, pysyncobj.pickle.loads)
            if regular is None:
                return Screened(message)
            self._SyncObj__recvTransmission = ""            # as PySyncObj does once it has the entry
            message = regular
        return screen(message, self._SyncObj__getEntries)

    # -- durability: group commit (see "Durability" in the module docstring) -----

    def _sync_journal(self) -> None:
        """Fsync the journal if anything was written since the last sync (tick thread only)."""
        sync = getattr(getattr(self, "_SyncObj__raftLog", None), "sync", None)  # MemoryJournal has none
        if sync is not None:
            sync()

    @property
    def journal_failure(self) -> JournalFailure | None:
        """Why this replica halted (its journal failed; see "Disk faults"), or None while it runs."""
        return getattr(getattr(self, "_SyncObj__raftLog", None), "failure", None)

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self.journal_failure is not None:
            # Halted: nothing runs until the node closes this replica. Idle one tick period, as PySyncObj
            # does while its transport is not ready (pacing PySyncObj's own loop, not a synchronisation).
            time.sleep(timeToWait)
            return
        if self._hold:
            self._hold_election()
        try:
            # The leader counts itself toward commits at the top of SyncObj._onTick: its entries first.
            self._sync_journal()
            self._joining.commit_before_tick()      # change 6
            super()._onTick(timeToWait)
        except Exception:
            if self.journal_failure is None:
                raise       # not a disk fault: PySyncObj logs it and ticks again, as before
            # A disk fault, logged once by the journal: from the next tick on, this replica idles.
        finally:
            self._joining.restore()                 # (a tick that returned early ran no callbacks)

    # -- change 6: a joiner counts once it has joined (kvs.raft.joiner) -----------

    def _SyncObj__changeCluster(self, request: Any) -> bool:
        # The leader's path only (`_checkCommandsToApply`): the entry is appended right after.
        accepted = SyncObj._SyncObj__changeCluster(self, request)
        if accepted:
            index = self._SyncObj__getCurrentLogIndex() + 1
            # PySyncObj means to refuse a change while the previous one is unapplied, but never sets
            # the index it checks: without this, two changes could be pending at once, and two
            # majorities of their configurations need not meet.
            self._SyncObj__changeClusterIDx = index
            self._joining.on_proposed(request, index)
        return accepted

    def counted_members(self) -> list[Any]:
        """The other members whose acknowledgements count toward a majority now (tick thread)."""
        return self._joining.counted()

    # -- change 5: a learner is promoted once the configuration names it -------------

    @property
    def promoted(self) -> bool:
        """A learner whose applied configuration includes its own address: a member now."""
        return self.learner and any(node.id == self.address for node in self.otherNodes)

    def _connect_also(self) -> None:
        """Every tick, a connection to each node of `_also_connect` (change 5: a replayed entry that removed
        the replica leading now dropped it; tests/test_in_place_membership.py)."""
        transport = self._SyncObj__transport
        for node in self._also_connect:
            transport.addNode(node)         # RaftTransport.addNode: nothing if it is connected already

    def _hold_election(self) -> None:
        if self._getLeader() is not None:
            self._hold = False                  # heard a leader: a member like any other from now on
        else:
            self._SyncObj__raftElectionDeadline = pysyncobj_clock() + self.conf.raftMaxTimeout

    def _sync_after_replication(self) -> None:
        # A tick callback registered after _replicate_now: the AppendEntries are already on their way,
        # so the leader's fsync overlaps the followers' instead of delaying the next tick.
        self._sync_journal()

    def _SyncObj__onBecomeLeader(self) -> None:
        # A new term: no joiner of an earlier one, and no earlier change pending (the no-op it appends
        # must commit before any change, which orders every change of an earlier term: PySyncObj's
        # own check). Left set, an index from a log tail since truncated would refuse every change
        # until the log grew past it.
        self._joining.forget()
        self._SyncObj__changeClusterIDx = None
        # The no-op it appends may be counted in the same tick (single-node group: the election and
        # the commit count both run at the top of _onTick, after our sync there).
        SyncObj._SyncObj__onBecomeLeader(self)
        self._sync_journal()

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        # clearJournal: a snapshot received from the leader was just renamed into place, unsynced;
        # make it durable before PySyncObj clears the journal and acknowledges the snapshot.
        journal = getattr(self, "_SyncObj__raftLog", None)
        path = self.conf.fullDumpFile
        if clearJournal and getattr(journal, "fsync", False) and path and os.path.exists(path):
            fsync_file_and_directory(path)
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        self._joining.forget()          # the member set came from the snapshot: nobody is joining
