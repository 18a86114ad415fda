#!/usr/bin/env python3
"""CPU per success, split by process kind, while a pgbench load runs.

Rates on a shared 2-core machine swing by a fifth from one minute to the
next; the CPU time spent per checkout swings much less, and it says which
process spends it.  This script starts pgbench with the arguments given
after "--", lets it settle, then reads utime + stime of every process from
/proc and a success count from the database, twice, WINDOW seconds apart,
and prints the CPU microseconds per success of each kind of process:
"batch workers", "backends" (client backends of the database), "pgbench",
"pg <kind>" for the other server processes (autovacuum, walwriter, ...).
The machine's busy share over the window comes from /proc/stat.

Usage (as a user that may read the processes' /proc entries, e.g. root):
  cpu-split.py --host DIR --port PORT [--db bench] [--settle 6] [--window 12] \\
      [--count-sql "SELECT count(*) FROM market.order_groups"] [--user postgres] \\
      -- <pgbench arguments without -T, host, port or database>
pgbench runs for settle + window + 3 seconds.  Example (docs/benchmarks.md):
  test/bench/cpu-split.py --host "$KEPT_CLUSTER_DIR" --port 55432 -- \\
      -c 64 -j 2 -M prepared -D base=1 -D nskus=100000 -f buynow1.sql@1 ...
"""
import argparse
import os
import subprocess
import sys
import time

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def psql(args, sql):
    cmd = ['psql', '-X', '-At', '-h', args.host, '-p', str(args.port), '-d', args.db, '-c', sql]
    if os.geteuid() == 0:
        cmd = ['runuser', '-u', args.user, '--'] + cmd
    return subprocess.check_output(cmd).decode().strip()


def process_kind(pid, db):
    """The kind of a process and its CPU ticks, or None for processes not counted."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmdline = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
        with open(f'/proc/{pid}/stat') as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(')') + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if cmdline.startswith('pgbench') or '/pgbench ' in cmdline + ' ':
        return 'pgbench', ticks
    if not cmdline.startswith('postgres:'):
        return None
    title = cmdline.split(':', 1)[1].strip()
    if 'batch worker' in title:
        return 'batch workers', ticks
    if title.split(' ')[1:2] == [db]:
        return 'backends', ticks
    return 'pg ' + title.split(' ')[0], ticks


def snapshot(db):
    found = {}
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            kind = process_kind(pid, db)
            if kind:
                found[pid] = kind
    return found


def machine_busy():
    with open('/proc/stat') as f:
        v = list(map(int, f.readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--host', required=True)
    ap.add_argument('--port', type=int, required=True)
    ap.add_argument('--db', default='bench')
    ap.add_argument('--user', default='postgres', help='OS user for psql and pgbench when run as root')
    ap.add_argument('--settle', type=float, default=6)
    ap.add_argument('--window', type=float, default=12)
    ap.add_argument('--count-sql', default='SELECT count(*) FROM market.order_groups')
    ap.add_argument('--pgbench', default='pgbench')
    ap.add_argument('pgbench_args', nargs=argparse.REMAINDER)
    args = ap.parse_args()
    extra = [a for a in args.pgbench_args if a != '--']
    cmd = [args.pgbench, '-n', '-h', args.host, '-p', str(args.port),
           '-T', str(int(args.settle + args.window + 3))] + extra + [args.db]
    if os.geteuid() == 0:
        cmd = ['runuser', '-u', args.user, '--', 'env', f'PGOPTIONS={os.environ.get("PGOPTIONS", "")}'] + cmd

    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(args.settle)
    n0, s0, (b0, t0), w0 = int(psql(args, args.count_sql)), snapshot(args.db), machine_busy(), time.time()
    time.sleep(args.window)
    n1, s1, (b1, t1), w1 = int(psql(args, args.count_sql)), snapshot(args.db), machine_busy(), time.time()
    output = load.communicate()[0].decode()
    if load.returncode != 0:
        sys.exit(f'cpu-split: pgbench failed:\n{output[-2000:]}')
    n = n1 - n0
    if n <= 0:
        sys.exit('cpu-split: nothing succeeded in the window')

    per_kind = {}
    for pid, (kind, ticks) in s1.items():
        before = s0.get(pid, (kind, 0))[1]	# a process born in the window counts from 0
        per_kind[kind] = per_kind.get(kind, 0) + ticks - before
    print(f'successes/s {n / (w1 - w0):.0f}  machine busy {100 * (b1 - b0) / (t1 - t0):.0f} %  '
          f'CPU per success, all processes {(b1 - b0) / CLOCK_TICKS / n * 1e6:.0f} us')
    for kind, ticks in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        if ticks > 0:
            print(f'  {kind:16s} {ticks / CLOCK_TICKS / n * 1e6:7.0f} us')


if __name__ == '__main__':
    main()
