#!/bin/bash
# The test suite's wall time and the CPU-seconds of everything it started, for BENCHMARKS.md:
#
#     sudo tools/suite_time.sh [pytest arguments]      # e.g. tools/suite_time.sh -n 2, or tests/test_stream.py -n 0
#
# `time uv run pytest` counts only the processes pytest waits for: Ray's raylet, its workers (one per actor, each
# importing torch) and agents are not among them, and it reported 17 of test_ray_executor's 97 CPU-seconds. A cgroup
# counts every process started inside it, however deep. Needs Linux and write access to the cgroup tree (root).
# Prints one line: wall s, CPU s (user + sys), the Ray sessions started and the Ray worker processes they ran.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d /sys/fs/cgroup/cpuacct ]; then                        # cgroup v1
    root=/sys/fs/cgroup/cpuacct
    usage() { awk -v hz="$(getconf CLK_TCK)" '{s += $2} END {print s / hz}' "$group/cpuacct.stat"; }
else                                                          # cgroup v2
    root=/sys/fs/cgroup
    usage() { awk '/^usage_usec/ {print $2 / 1e6}' "$group/cpu.stat"; }
fi
group=$root/distlocal_suite_$$
mkdir "$group"
echo $$ > "$group/cgroup.procs"
ray_tmp=$(mktemp -d /tmp/suite_ray.XXXX)                     # the run's Ray sessions only: they are counted below
start=$(date +%s.%N)
rc=0
RAY_TMPDIR=$ray_tmp uv run pytest -p no:cacheprovider "$@" || rc=$?
wall=$(echo "$(date +%s.%N) - $start" | bc)
cpu=$(usage)
sessions=$(find "$ray_tmp" -maxdepth 2 -name 'session_2*' -type d | wc -l)
workers=$(find "$ray_tmp" -path '*/logs/python-core-worker-*.log' | wc -l)
echo "suite: exit $rc, wall $wall s, CPU $cpu s (user + sys, every process it started), $sessions Ray sessions," \
     "$workers Ray worker processes, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$ray_tmp"
echo $$ > "$root/cgroup.procs"  # out of the group, which goes once its last process has (a leftover keeps it)
rmdir "$group" 2>/dev/null || true
exit $rc
