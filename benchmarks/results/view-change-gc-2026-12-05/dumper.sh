#!/bin/bash
# py-spy (pip install py-spy) on PATH, e.g. the venv's bin/
# usage: dumper.sh PID OUT SECONDS  -- py-spy dump --nonblocking every ~20 ms with a timestamp
end=$(( $(date +%s) + $3 ))
while [ $(date +%s) -lt $end ]; do
  echo "=== $(date +%H:%M:%S.%N)" >> $2
  py-spy dump --nonblocking -p $1 >> $2 2>/dev/null
done
