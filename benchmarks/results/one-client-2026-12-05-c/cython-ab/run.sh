#!/bin/bash
cd /work/main
for i in 1 2 3; do
  for v in base cy; do
    if [ $v = base ]; then PY=/work/main/.venv/bin/python; else PY=/tmp/cy/bin/python; fi
    timeout 300 $PY benchmarks/suite.py throughput --seconds 6 --repeat 1 --clients 1 --systems kvs-leader,kvs-follower --no-report --out /tmp/m/cyab/$v-$i.json > /tmp/m/cyab/$v-$i.log 2>&1
    echo "$v $i: $(grep -o 'ok req/s, p50 [0-9.]* ms' /tmp/m/cyab/$v-$i.log | tr '\n' ' ')"
  done
done
