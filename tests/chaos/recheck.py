"""Re-check a saved chaos run: `python -m tests.chaos.recheck chaos-artifacts/chaos-process-seed7.json`.

Prints the fault schedule (rerun it with KVS_CHAOS_SEED=<seed>) and checks the
saved history again with the linearizability checker.
"""

from __future__ import annotations

import json
import sys

from kvs.testing.linearizability import check_history, history_from_json


def main(path: str) -> int:
    with open(path) as f:
        saved = json.load(f)
    print(f"seed {saved['seed']}, {saved['duration']} s; rerun: KVS_CHAOS_SEED={saved['seed']} "
          f"KVS_CHAOS_SECONDS={saved['duration']} python -m pytest -q -m chaos tests/chaos")
    for fault in saved["faults"]:
        healed = "never (retired)" if fault["healed"] is None else f"{fault['healed']}s"
        print(f"  {fault['kind']:17} shard {fault['shard']} nodes {fault['nodes']} "
              f"at {fault['injected']}s, healed {healed}")
    for change in saved.get("view_changes", []):
        print(f"  view change      {change['description']}")
    if "final_epoch" in saved:
        print(f"  final epoch {saved['final_epoch']}")
    print("violations recorded:", *saved["violations"][:10], sep="\n  ")
    result = check_history(history_from_json(saved["history"]))
    print(result.summary())
    for failure in result.failures()[:10]:
        print(f"  {failure.key}: {failure.explanation}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
