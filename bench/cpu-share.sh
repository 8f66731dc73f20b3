#!/usr/bin/env bash
# Where the CPU goes while a command runs: CPU seconds by process name
# (omnibox, postgres, tansu, ...) and how busy the whole machine was.
#
#   bench/cpu-share.sh COMMAND [ARGS...]
#   bench/cpu-share.sh bench/run.sh publish --events 20000 --batch 1000 --sink kafka --rounds 1
#
# Samples /proc every 250 ms; a process that lives less than that may be
# missed (its share shows in "other" through the machine's total). Prints
# the command's own output first, then the table on stderr.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: bench/cpu-share.sh COMMAND [ARGS...]" >&2; exit 2; }

snapshot() {
  # pid comm utime+stime (clock ticks), one line per process
  for f in /proc/[0-9]*/stat; do
    # comm may hold spaces: take what is inside the parentheses
    read -r line < "$f" 2>/dev/null || continue
    local pid=${line%% *}
    local rest=${line#*(}
    local comm=${rest%)*}
    local after=${rest##*) }
    # fields after comm: state ppid ... utime is the 12th, stime the 13th
    set -- $after
    echo "$pid ${comm// /_} $(( ${12} + ${13} ))"
  done
}

total_busy() {
  # busy and all ticks of the machine
  read -r _ user nice system idle iowait irq softirq steal _ < /proc/stat
  echo "$((user + nice + system + irq + softirq + steal)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
read -r busy0 all0 < <(total_busy)
start=$(date +%s.%N)
# The processes already running: counted from here; any other from zero.
{ snapshot; echo "---"; } > "$tmp/samples"
"$@" &
cmd=$!
while kill -0 "$cmd" 2>/dev/null; do
  snapshot >> "$tmp/samples"
  echo "---" >> "$tmp/samples"
  sleep 0.25
done
wait "$cmd" || rc=$?
end=$(date +%s.%N)
read -r busy1 all1 < <(total_busy)
hz=$(getconf CLK_TCK)
cores=$(nproc)
awk -v hz="$hz" -v busy=$((busy1 - busy0)) -v all=$((all1 - all0)) \
    -v secs="$(echo "$end - $start" | bc)" -v cores="$cores" '
  $1 == "---" { base_done = 1; next }
  {
    # By pid: a kernel worker renames itself as it works.
    key = $1
    if (key in first) { last[key] = $3 }
    else { first[key] = base_done ? 0 : $3; last[key] = $3 }
    n2 = $2; sub(/[-\/].*/, "", n2); name[key] = n2
  }
  END {
    for (k in first) { by[name[k]] += (last[k] - first[k]) / hz }
    printf "%-16s %10s %8s\n", "process", "cpu s", "share" > "/dev/stderr"
    seen = 0
    n = 0
    for (p in by) { if (by[p] >= 0.05) { order[++n] = p } }
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (by[order[j]] > by[order[i]]) { t = order[i]; order[i] = order[j]; order[j] = t }
    machine = busy / hz
    for (i = 1; i <= n; i++) { p = order[i]; seen += by[p]; printf "%-16s %10.2f %7.0f%%\n", p, by[p], 100 * by[p] / (machine > 0 ? machine : 1) > "/dev/stderr" }
    printf "%-16s %10.2f %7.0f%%\n", "other/missed", machine - seen, 100 * (machine - seen) / (machine > 0 ? machine : 1) > "/dev/stderr"
    printf "machine: %.1f s wall, %d cores, %.0f%% busy (%.2f CPU s of %.2f)\n", secs, cores, 100 * busy / (all > 0 ? all : 1), machine, all / hz > "/dev/stderr"
  }' "$tmp/samples"
exit "${rc:-0}"
