"""A Raft message's codec, warm: pickle, seal (pickle + AES-GCM) and open (AES-GCM + restricted unpickle)
of an AppendEntries carrying one 256-byte write, each timed over 20,000 calls in a loop.

    PYTHONPATH=. python benchmarks/results/one-client-2026-12-05-b/codec_warm.py
"""
import os
import pickle
import timeit

from kvs.raft import codec, wire

N = 20_000
message = {"type": "append_entries", "term": 5, "commit_index": 1000, "prevLogIdx": 1000, "prevLogTerm": 5,
           "entries": [(pickle.dumps(("batch", [("put", "id-abcdef0123", "k", "x" * 256, None)])), 1001, 5)],
           "_g": "shard-0"}
key = os.urandom(32)
sealer, opener, sender = wire.SessionCipher(key), wire.SessionCipher(key), wire.SessionCipher(key)
frames = iter([sender.seal(message) for _ in range(N)])    # one direction's frames, in order
pickled = pickle.dumps(message, protocol=5)
for name, call in (("pickle.dumps", lambda: pickle.dumps(message, protocol=5)),
                   ("SessionCipher.seal", lambda: sealer.seal(message)),
                   ("SessionCipher.open", lambda: opener.open(next(frames))),
                   ("codec.loads (restricted)", lambda: codec.loads(pickled))):
    print(f"{name:26} {timeit.timeit(call, number=N) / N * 1e6:5.1f} µs")
