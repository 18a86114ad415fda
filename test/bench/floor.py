#!/usr/bin/env python3
"""The floor under a batched checkout: what its rows alone cost to write.

A checkout of the benchmark's carts leaves about 19 rows behind (an order
group, 2.5 orders with their 2.9 lines and 2.5 creation events, a payment,
3.5 outbox rows, a reservation, 2.9 ledger rows, a checkout row, an
idempotency key written and then updated) and moves 2.9 stock slots.  This
script writes exactly that, for N checkouts at once, in the cheapest way SQL
has: one INSERT ... SELECT generate_series per table (one UPDATE for the
slots), in one transaction, into copies of market's tables made with
CREATE TABLE ... (LIKE ... INCLUDING ALL) and the same storage parameters:
the same columns, defaults, identity columns, CHECK constraints and indexes,
but no triggers (no state machine, no reference checks, no events written
by trigger), no idempotency logic, no price lookups, one statement per table
instead of several per checkout.  No checkout can cost less than this; the
batch worker's whole cost per checkout is compared with it in
docs/benchmarks.md ("The budget").

It reads the CPU time (utime + stime, /proc) of its own backend around the
transaction (commit included), so it must run on the database's machine as
a user that may read that backend's /proc entry (root, or the postgres OS
user).  The copies live in a scratch schema, market_floor, dropped at the
end.  The market extension must be installed in the database.

Usage:
  floor.py --host DIR --port PORT [--db bench] [--checkouts 20000] [--rounds 3]
           [--lines 2.9] [--orders 2.5] [--user postgres]
Prints, per round, the backend's CPU and the elapsed time per checkout, then
their medians.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')

TABLES = ['idempotency_keys', 'order_groups', 'reservations', 'stock_ledger', 'orders',
          'order_lines', 'order_events', 'outbox', 'payments', 'checkouts', 'stock_slots']

# A response document of the size buy_now stores (about 270 bytes).
RESPONSE = ('{"orders": [{"status": "created", "order_id": 466132, "seller_id": 4, '
            '"subtotal_minor": 100}, {"status": "created", "order_id": 466133, "seller_id": 7, '
            '"subtotal_minor": 200}], "payment": {"status": "pending", "currency": "EUR", '
            '"payment_id": 185972, "amount_minor": 300}, "order_group": 185972}')


def statements(n, lines, orders):
    """The transaction: every row n checkouts leave, one statement per table."""
    return [
        "INSERT INTO market_floor.idempotency_keys (customer_id, key, operation, fingerprint)"
        f" SELECT 'bench-' || (i % 64), gen_random_uuid()::text, 'buy_now', sha256(i::text::bytea)"
        f" FROM generate_series(1, {n}) i",
        "INSERT INTO market_floor.order_groups (checkout_id, customer_id, currency, total_minor)"
        f" SELECT gen_random_uuid(), 'bench-' || (i % 64), 'EUR', 300 FROM generate_series(1, {n}) i",
        "INSERT INTO market_floor.reservations (id, owner, status, created_at, expires_at,"
        " sku_ids, warehouse_ids, slots, qtys, finished_at)"
        " SELECT gen_random_uuid(), 'checkout ' || gen_random_uuid(), 'committed', now(), now(),"
        " '{15,48016,77}', '{1,1,1}', '{13,13,13}', '{1,1,1}', now()"
        f" FROM generate_series(1, {n}) i",
        "INSERT INTO market_floor.stock_ledger (sku_id, warehouse_id, delta, kind, reservation_id)"
        f" SELECT (i * 7919) % 100000 + 1, 1, -1, 'sale', gen_random_uuid() FROM generate_series(1, {lines}) i",
        "INSERT INTO market_floor.orders (group_id, seller_id, customer_id, currency, subtotal_minor)"
        f" SELECT i / 3, i % 3, 'bench-' || (i % 64), 'EUR', 100 FROM generate_series(1, {orders}) i",
        "INSERT INTO market_floor.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)"
        f" SELECT i, (i * 7919) % 100000 + 1, 1, 1, 100 FROM generate_series(1, {lines}) i",
        "INSERT INTO market_floor.order_events (order_id, from_status, to_status)"
        f" SELECT i, NULL, 'created' FROM generate_series(1, {orders}) i",
        "INSERT INTO market_floor.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
        " SELECT 'events', 'order.created', 'order', i, jsonb_build_object('at', now(), 'to', 'created',"
        " 'from', NULL, 'group_id', i / 3, 'order_id', i, 'seller_id', i % 3)"
        f" FROM generate_series(1, {orders}) i",
        "INSERT INTO market_floor.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
        " SELECT 'psp', 'payment.authorize', 'payment', i, jsonb_build_object('payment_id', i,"
        " 'group_id', i, 'amount_minor', 300, 'currency', 'EUR', 'method', 'pm_card_visa', 'psp', NULL)"
        f" FROM generate_series(1, {n}) i",
        "INSERT INTO market_floor.payments (group_id, customer_id, currency, amount_minor, method)"
        f" SELECT i, 'bench-' || (i % 64), 'EUR', 300, 'pm_card_visa' FROM generate_series(1, {n}) i",
        "INSERT INTO market_floor.checkouts (id, cart_id, customer_id, currency, reservation_id, status,"
        " sku_ids, qtys, unit_prices, seller_ids, total_minor, expires_at, completed_at, group_id)"
        " SELECT gen_random_uuid(), NULL, 'bench-' || (i % 64), 'EUR', gen_random_uuid(), 'completed',"
        " '{1,2,3}', '{1,1,1}', '{100,100,100}', '{1,2,3}', 300, now(), now(), i"
        f" FROM generate_series(1, {n}) i",
        # one slot moved per line (distinct rows: an UPDATE moves a row once)
        "UPDATE market_floor.stock_slots s SET free = free - 1, on_hand = on_hand - 1"
        f" WHERE s.sku_id <= {lines} AND s.warehouse_id = 1 AND s.slot = 0",
        f"UPDATE market_floor.idempotency_keys SET response = '{RESPONSE}'",
    ]


class Psql:
    """One psql session driven through its standard input."""

    def __init__(self, args):
        cmd = ['psql', '-X', '-At', '-q', '-v', 'ON_ERROR_STOP=1',
               '-h', args.host, '-p', str(args.port), '-d', args.db]
        if os.geteuid() == 0:
            cmd = ['runuser', '-u', args.user, '--'] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def run(self, sql):
        """Runs sql and returns the lines it printed before a marker."""
        self.proc.stdin.write(sql.rstrip().rstrip(';') + ";\nSELECT '--done--';\n")
        self.proc.stdin.flush()
        out = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                sys.exit('floor: psql ended (see its error above)')
            line = line.rstrip('\n')
            if line == '--done--':
                return out
            out.append(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def cpu_ticks(pid):
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return int(fields[11]) + int(fields[12])


def setup(db, slot_rows):
    parts = ['DROP SCHEMA IF EXISTS market_floor CASCADE', 'CREATE SCHEMA market_floor']
    for t in TABLES:
        parts.append(f'CREATE TABLE market_floor.{t} (LIKE market.{t} INCLUDING ALL)')
    db.run(';\n'.join(parts))
    # the same storage parameters (fillfactor) as the originals
    for t, opts in (r.split('|') for r in db.run(
            "SELECT relname, array_to_string(reloptions, ', ') FROM pg_class"
            " WHERE relnamespace = 'market'::regnamespace AND reloptions IS NOT NULL"
            f" AND relname IN ({', '.join(repr(t) for t in TABLES)})")):
        db.run(f'ALTER TABLE market_floor.{t} SET ({opts})')
    db.run("INSERT INTO market_floor.stock_slots (sku_id, warehouse_id, slot, on_hand, free)"
           f" SELECT i, 1, 0, 1000000, 1000000 FROM generate_series(1, {slot_rows}) i;"
           " VACUUM ANALYZE market_floor.stock_slots")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--host', required=True)
    ap.add_argument('--port', type=int, required=True)
    ap.add_argument('--db', default='bench')
    ap.add_argument('--user', default='postgres')
    ap.add_argument('--checkouts', type=int, default=20000)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--lines', type=float, default=2.9, help='order lines (and slots moved) per checkout')
    ap.add_argument('--orders', type=float, default=2.5, help='orders (sellers) per checkout')
    args = ap.parse_args()
    n = args.checkouts
    lines = round(args.lines * n)
    orders = round(args.orders * n)

    db = Psql(args)
    db.run('SET client_min_messages = warning')
    pid = int(db.run('SELECT pg_backend_pid()')[0])
    cpu, wall = [], []
    try:
        for r in range(args.rounds):
            setup(db, lines)
            db.run('CHECKPOINT')
            t0, c0 = time.time(), cpu_ticks(pid)
            db.run('BEGIN;\n' + ';\n'.join(statements(n, lines, orders)) + ';\nCOMMIT')
            c1, t1 = cpu_ticks(pid), time.time()
            cpu.append((c1 - c0) / CLOCK_TICKS / n * 1e6)
            wall.append((t1 - t0) / n * 1e6)
            print(f'round {r + 1}: {n} checkouts, backend CPU {cpu[-1]:.0f} us/checkout,'
                  f' elapsed {wall[-1]:.0f} us/checkout', flush=True)
    finally:
        db.run('DROP SCHEMA IF EXISTS market_floor CASCADE')
        db.close()
    print(f'median: backend CPU {statistics.median(cpu):.0f} us/checkout,'
          f' elapsed {statistics.median(wall):.0f} us/checkout'
          f' ({args.lines} lines, {args.orders} orders per checkout)')


if __name__ == '__main__':
    main()
