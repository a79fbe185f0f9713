"""Run one command and report its wall time and peak RSS (used by bench/run).

    python -I -S bench/_spawn.py RESULT_FILE COMMAND [ARGS...]

Why a separate small process: a child's peak RSS (ru_maxrss from wait4) also
counts the memory of the process it was forked from, up to the exec. Forked from
the runner (receiver thread, parsed results), every program would show the
runner's size; forked from this minimal interpreter (-I -S, no imports beyond
built-ins) the inherited part is a few MB, below any Python program's own peak.
Exit status: the command's (128 + signal when killed by one).
"""
import os
import sys
import time

result_file, command = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(result_file, "w") as f:
    f.write('{"wall_s": %r, "maxrss_kb": %d, "status": %d}' % (wall, usage.ru_maxrss, status))
if os.WIFSIGNALED(status):
    os._exit(128 + os.WTERMSIG(status))
os._exit(os.WEXITSTATUS(status))
