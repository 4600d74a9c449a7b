"""Baselines on this machine's PostgreSQL: what the hardware does without Clean Ledger.

    .venv/bin/python bench/baseline.py [--clients 16] [--seconds 20] [--scale 16] [--accounts 10000]

1. pgbench's built-in TPC-B-like script (`-b tpcb-like`: 3 UPDATEs, a SELECT and an INSERT per transaction)
   at the server's default isolation (read committed), prepared statements, at a scale of at least the
   client count, so its branch rows (one per scale unit) are not the bottleneck.
2. A plain-SQL posting: `post_transfer(src, dst, amount)`, a PL/pgSQL function on its own tables (accounts
   with a balance, transfers, entries) over `--accounts` accounts. It locks both accounts
   (`SELECT ... ORDER BY id FOR UPDATE`), updates both balances (a CHECK keeps them >= 0), inserts the
   transfer and its two entries (foreign keys to both), in one statement per transaction, driven by pgbench
   with a custom script: `uniform` (random source and destination, never equal) and `hot` (every transfer
   into account 1). It is the least a double-entry posting must do, written the fast way, so a ratio against
   it says what the ledger's extra guarantees (idempotency, outbox, SERIALIZABLE, Python) cost.

The other scripts import `tpcb_like` and `plain_sql` to measure the same baselines in their own runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PgbenchResult,
    checkpoint,
    fresh_database,
    machine_facts,
    pgbench,
    pgbench_init,
    print_machine,
    run_started,
    write_results,
)

CASES = ("uniform", "hot")
HOT_ACCOUNT = 1
OPENING_BALANCE = 10**12

SCHEMA = """
CREATE TABLE accounts (
    id          bigint PRIMARY KEY,
    balance     bigint NOT NULL CHECK (balance >= 0),
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE transfers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id   bigint NOT NULL REFERENCES accounts (id),
    dest_id     bigint NOT NULL REFERENCES accounts (id),
    amount      bigint NOT NULL CHECK (amount > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (source_id <> dest_id)
);
CREATE TABLE entries (
    transfer_id   bigint NOT NULL REFERENCES transfers (id),
    account_id    bigint NOT NULL REFERENCES accounts (id),
    sequence      bigint NOT NULL,
    amount        bigint NOT NULL CHECK (amount <> 0),
    balance_after bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, sequence)
);
CREATE INDEX entries_transfer_idx ON entries (transfer_id);

CREATE FUNCTION post_transfer(p_src bigint, p_dst bigint, p_amount bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_transfer bigint;
    v_src_balance bigint;
    v_src_version bigint;
    v_dst_balance bigint;
    v_dst_version bigint;
BEGIN
    -- Both rows locked in one global order (id), so A->B and B->A queue instead of deadlocking.
    PERFORM 1 FROM accounts WHERE id IN (p_src, p_dst) ORDER BY id FOR UPDATE;
    UPDATE accounts SET balance = balance - p_amount, version = version + 1, updated_at = now()
        WHERE id = p_src RETURNING balance, version INTO v_src_balance, v_src_version;
    UPDATE accounts SET balance = balance + p_amount, version = version + 1, updated_at = now()
        WHERE id = p_dst RETURNING balance, version INTO v_dst_balance, v_dst_version;
    IF v_src_balance IS NULL OR v_dst_balance IS NULL THEN
        RAISE EXCEPTION 'account % or % does not exist', p_src, p_dst;
    END IF;
    INSERT INTO transfers (source_id, dest_id, amount) VALUES (p_src, p_dst, p_amount)
        RETURNING id INTO v_transfer;
    INSERT INTO entries (transfer_id, account_id, sequence, amount, balance_after) VALUES
        (v_transfer, p_src, v_src_version, -p_amount, v_src_balance),
        (v_transfer, p_dst, v_dst_version, p_amount, v_dst_balance);
    RETURN v_transfer;
END $$;
"""

# pgbench scripts; `:accounts` comes from `-D accounts=N`.
SCRIPTS = {
    "uniform": (
        "\\set src random(1, :accounts)\n"
        "\\set step random(1, :accounts - 1)\n"
        "\\set dst 1 + (:src - 1 + :step) % :accounts\n"  # any account but src, uniformly
        "\\set amount random(1, 1000)\n"
        "SELECT post_transfer(:src, :dst, :amount);\n"
    ),
    "hot": (
        f"\\set src random({HOT_ACCOUNT + 1}, :accounts)\n"
        "\\set amount random(1, 1000)\n"
        f"SELECT post_transfer(:src, {HOT_ACCOUNT}, :amount);\n"
    ),
}


def tpcb_like(*, clients: int, seconds: int, scale: int | None = None) -> PgbenchResult:
    """pgbench -b tpcb-like, read committed, prepared, in a fresh database at `scale` (default: at least
    16 and at least `clients`, so no two clients need share a branch row on average)."""
    scale = scale or max(16, clients)
    with fresh_database("bench_tpcb") as url:
        pgbench_init(url, scale)
        checkpoint(url)
        return pgbench(url, ["-b", "tpcb-like"], clients=clients, seconds=seconds)


def setup_plain_sql(url: str, accounts: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO accounts (id, balance) SELECT g, %s FROM generate_series(1, %s) g",
            (OPENING_BALANCE, accounts),
        )
        conn.execute("VACUUM ANALYZE accounts")


def check_plain_sql(url: str, accounts: int) -> dict[str, object]:
    """The baseline did real double-entry work: money conserved, entries balance, two per transfer."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT sum(balance) FROM accounts), (SELECT count(*) FROM transfers),"
            " (SELECT count(*) FROM entries), (SELECT coalesce(sum(amount), 0) FROM entries)"
        ).fetchone()
    assert row is not None
    total, transfers, entries, entry_sum = row
    conserved = total == OPENING_BALANCE * accounts
    ok = conserved and entries == 2 * transfers and entry_sum == 0
    return {"ok": ok, "transfers": transfers, "entries": entries, "money_conserved": conserved}


def plain_sql(
    *, clients: int, seconds: int, accounts: int = 10_000, cases: tuple[str, ...] = CASES
) -> tuple[dict[str, PgbenchResult], dict[str, object]]:
    """`post_transfer` driven by pgbench, one fresh database with `accounts` accounts, each case in turn.
    Returns the results per case and the consistency check of the database afterwards."""
    with fresh_database("bench_plainsql") as url, tempfile.TemporaryDirectory(prefix="bench-plainsql-") as tmp:
        setup_plain_sql(url, accounts)
        results = {}
        for case in cases:
            script = Path(tmp) / f"{case}.sql"
            script.write_text(SCRIPTS[case])
            checkpoint(url)
            results[case] = pgbench(
                url, ["-f", str(script), "-D", f"accounts={accounts}"], clients=clients, seconds=seconds
            )
        return results, check_plain_sql(url, accounts)


def describe(result: PgbenchResult) -> str:
    extra = f", {result.failed} failed" if result.failed else ""
    extra += f", {result.retried} retried" if result.retried else ""
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in result.cpu_ms_per_tx.items() if v is not None)
    return (
        f"{result.tps:9,.0f} tps  ({result.transactions:,} in {result.seconds} s, {result.clients} clients,"
        f" mean latency {result.latency_ms:.2f} ms{extra})  CPU ms/tx: {cpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--scale", type=int, default=None, help="pgbench scale (default: max(16, clients))")
    parser.add_argument("--accounts", type=int, default=10_000)
    args = parser.parse_args()
    started = run_started()
    machine = machine_facts()
    print_machine(machine)
    scale = args.scale or max(16, args.clients)
    tpcb = tpcb_like(clients=args.clients, seconds=args.seconds, scale=scale)
    plain, check = plain_sql(clients=args.clients, seconds=args.seconds, accounts=args.accounts)
    print(f"pgbench tpcb-like, read committed, scale {scale}: {describe(tpcb)}")
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case:8}:           {describe(result)}")
    print(f"plain-SQL books after the run: {check}")
    ratios = {
        "plain_uniform/tpcb": plain["uniform"].tps / tpcb.tps,
        "plain_hot/plain_uniform": plain["hot"].tps / plain["uniform"].tps,
    }
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    write_results(
        "baseline",
        started=started,
        machine=machine,
        parameters={**vars(args), "scale": scale},
        figures={"tpcb_like": tpcb, "plain_sql": plain},
        ratios=ratios,
        checks={"plain_sql": check},
    )


if __name__ == "__main__":
    main()
