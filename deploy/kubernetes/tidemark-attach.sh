#!/bin/sh
# tidemark-attach: starts tidemark-sidecar next to an app in one Kubernetes pod.
#
# With `shareProcessNamespace: true` the pod's containers share one process
# namespace, so the sidecar container sees the app's processes. This script
# finds the app's process by name, waits for it if the app is still starting,
# and runs tidemark-sidecar with the script's arguments plus one of:
#
#   --app-cgroup=/proc/PID/root/sys/fs/cgroup
#       the app container's own cgroup (v2): the CPU and memory of all its
#       processes and threads. Readable when the sidecar runs as the app's
#       user (or with CAP_SYS_PTRACE).
#   --app-pid=PID
#       the process alone, when its container's cgroup cannot be read.
#
# Environment:
#   APP_PROCESS       required: the app's process name as /proc/PID/comm has it
#                     (the executable's name, at most 15 characters: java, node,
#                     python3, ...); several matches: the lowest PID, the first started
#   APP_WAIT_SECONDS  how long to wait for the process (default 60)
#
# If the app's container restarts, its process is a new one: restart the pod
# (or the sidecar container) so that the sidecar samples the new process.
set -eu

name=${APP_PROCESS:-}
if [ -z "$name" ]; then
  echo "tidemark-attach: APP_PROCESS is not set: set it to the app's process name (ps -o comm in the app container)" >&2
  exit 2
fi
wait=${APP_WAIT_SECONDS:-60}
waited=0
while :; do
  pid=""
  for dir in /proc/[0-9]*; do
    p=${dir#/proc/}
    [ "$p" = "$$" ] && continue
    comm=$(cat "$dir/comm" 2>/dev/null) || continue
    if [ "$comm" = "$name" ] && { [ -z "$pid" ] || [ "$p" -lt "$pid" ]; }; then
      pid=$p
    fi
  done
  [ -n "$pid" ] && break
  if [ "$waited" -ge "$wait" ]; then
    echo "tidemark-attach: no process named '$name' in this pod after ${wait}s: set APP_PROCESS to the app's process name (ps -o comm in the app container) and shareProcessNamespace: true in the pod spec" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done

cgroup=/proc/$pid/root/sys/fs/cgroup
if [ -r "$cgroup/cpu.stat" ] && [ -r "$cgroup/memory.current" ]; then
  echo "tidemark-attach: app '$name' is process $pid; sampling its container's cgroup $cgroup" >&2
  exec tidemark-sidecar --app-cgroup="$cgroup" "$@"
fi
echo "tidemark-attach: app '$name' is process $pid; its container's cgroup is not readable (run the sidecar as the app's user), sampling the process alone" >&2
exec tidemark-sidecar --app-pid="$pid" "$@"
