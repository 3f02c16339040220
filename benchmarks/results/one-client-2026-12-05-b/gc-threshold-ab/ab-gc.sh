#!/bin/bash
out=/tmp/ab-gc; mkdir -p $out; cd /work/main
for i in 1 2 3; do
  for mode in off on; do
    KVS_GC_EXPERIMENT=$mode PYTHONPATH=/tmp/gcx timeout 300 /work/main/.venv/bin/python benchmarks/suite.py throughput --seconds 6 --repeat 1 --clients 1 --systems kvs-leader,kvs-follower --no-report --out $out/$mode-$i.json > $out/$mode-$i.log 2>&1
    echo "$mode $i: $(grep -A1 'write x1' $out/$mode-$i.log | grep 'ok req' | sed 's/, p99.*//; s/^\[.*\]  //' | tr '\n' '|')"
  done
done
