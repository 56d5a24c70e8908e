#!/bin/bash
# A goodput run with py-spy profiles of its decoder and gateway: 6 s of samples, 12 s after the stack is up,
# GIL-holding samples and all samples of each, in $OUT/profiles/ (summaries: python -m bench.py_spy_summary FILE).
#
#   bash bench/profile_load.sh NAME [bench.goodput flags...]
#   bash bench/profile_load.sh text_si4 --device cuda --model random-12b --workloads text-256 \
#       --requests-per-caller 3 --warmup 8 --set stream_interval=4
#
# Needs py-spy (pip install py-spy) and the right to trace the processes (root, or ptrace allowed).
set -u
name=$1; shift
out=${OUT:-bench-results}; mkdir -p "$out/profiles"
spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
python -m bench.goodput --name "$name" "$@" > "$out/$name.txt" 2>&1 &
run=$!
for _ in $(seq 1 600); do grep -q "roles' logs" "$out/$name.txt" && break; sleep 1; done
sleep 12
for role in decoder gateway; do
  pid=$(pgrep -f "m services.$role" | head -1)
  "$spy" record --pid "$pid" --gil --nonblocking -d 6 -r 200 --format raw -o "$out/profiles/${name}_${role}_gil.raw" \
    > /dev/null 2>&1 &
  "$spy" record --pid "$pid" --nonblocking -d 6 -r 200 --format raw -o "$out/profiles/${name}_${role}_all.raw" \
    > /dev/null 2>&1 &
done
wait $run
status=$?
wait
tail -2 "$out/$name.txt"
exit $status
