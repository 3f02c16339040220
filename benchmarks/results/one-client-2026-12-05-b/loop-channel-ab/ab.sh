#!/bin/bash
# alternate the prototype channel off/on; writes at 1 client via a follower, etcd's follower beside
out=/tmp/ab; mkdir -p $out; cd /tmp/wt-proto
for i in 1 2 3; do
  for mode in off on; do
    rm -rf /tmp/kvs-proto-channel
    KVS_PROTO_CHANNEL=$mode PYTHONPATH=/tmp/wt-proto timeout 300 /work/main/.venv/bin/python /tmp/wt-proto/benchmarks/suite.py throughput --seconds 6 --repeat 1 --clients 1 --systems kvs-follower,etcd-follower --no-report --out $out/$mode-$i.json > $out/$mode-$i.log 2>&1
    echo "$mode $i used=$(ls /tmp/kvs-proto-channel 2>/dev/null | grep -c used) $(grep -A1 'write x1' $out/$mode-$i.log | grep -o 'p50 [0-9.]* ms\|^[^[]*[0-9,]* ok req/s' | tr '\n' ' ')"
    grep -A1 'write x1' $out/$mode-$i.log | grep 'ok req' | sed 's/;.*//'
  done
done
