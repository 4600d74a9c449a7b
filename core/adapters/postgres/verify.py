"""The invariant checker: re-derives the books from the entries and reports every disagreement.

Runs in one REPEATABLE READ READ ONLY snapshot, so concurrent postings cannot make it see half a
transaction. Each check is one set-based query and lists its offending rows (capped)."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import Connection
from psycopg.rows import TupleRow

from core.domain.ids import external_account_id

# Offending rows reported per check, at most.
MAX_REPORTED = 50
SYSTEM_IDS = "every system account sits on the id derived from its tenant and currency"

CHECKS: dict[str, str] = {
    "books balance per currency (sum of all entries is 0)": """
        SELECT currency, sum(amount) FROM entries GROUP BY currency HAVING sum(amount) <> 0
    """,
    "every transaction is balanced per currency and has >= 2 entries": """
        SELECT t.id, e.currency, coalesce(sum(e.amount), 0), count(e.*)
        FROM transactions t LEFT JOIN entries e ON e.transaction_id = t.id
        GROUP BY t.id, e.currency
        HAVING coalesce(sum(e.amount), 0) <> 0 OR count(e.*) < 2
    """,
    "every entry belongs to an existing transaction and account": """
        SELECT e.tenant_id, e.account_id, e.sequence, e.transaction_id FROM entries e
        LEFT JOIN transactions t ON t.id = e.transaction_id
        LEFT JOIN accounts a ON a.tenant_id = e.tenant_id AND a.id = e.account_id
        WHERE t.id IS NULL OR a.id IS NULL
    """,
    "a closed account holds nothing (it closes only at zero, and nothing posts to it after)": """
        SELECT id, tenant_id, posted_balance FROM accounts WHERE status = 'closed' AND posted_balance <> 0
    """,
    "every idempotency key has its operation": """
        SELECT k.tenant_id, k.key, k.operation_id FROM idempotency_keys k
        LEFT JOIN operations o ON o.id = k.operation_id
        WHERE o.id IS NULL
    """,
    "entries are in their account's currency and tenant": """
        SELECT e.tenant_id, e.account_id, e.sequence, e.currency, a.currency
        FROM entries e JOIN accounts a ON a.tenant_id = e.tenant_id AND a.id = e.account_id
        JOIN transactions t ON t.id = e.transaction_id
        WHERE e.currency <> a.currency OR t.tenant_id <> a.tenant_id
    """,
    "stored balance and version equal the sum and count of the account's entries": """
        SELECT a.tenant_id, a.id, a.posted_balance, coalesce(s.total, 0), a.version, coalesce(s.n, 0)
        FROM accounts a
        LEFT JOIN (SELECT tenant_id, account_id, sum(amount) AS total, count(*) AS n, max(sequence) AS last
                   FROM entries GROUP BY tenant_id, account_id) s ON s.tenant_id = a.tenant_id AND s.account_id = a.id
        WHERE a.posted_balance <> coalesce(s.total, 0) OR a.version <> coalesce(s.n, 0)
           OR a.version <> coalesce(s.last, 0)
    """,
    "balance_after chain: each entry's balance_after = previous + amount, sequence 1..n": """
        SELECT tenant_id, account_id, sequence, balance_after, expected, prev_seq FROM (
            SELECT tenant_id, account_id, sequence, balance_after,
                   sum(amount) OVER w AS expected,
                   lag(sequence, 1, 0::bigint) OVER w AS prev_seq
            FROM entries WINDOW w AS (PARTITION BY tenant_id, account_id ORDER BY sequence)
        ) c
        WHERE balance_after <> expected OR sequence <> prev_seq + 1
    """,
    "restricted accounts are within their overdraft limit": """
        SELECT id, posted_balance, overdraft_limit FROM accounts
        WHERE overdraft_limit IS NOT NULL AND posted_balance < -overdraft_limit
    """,
    "no customer account sits on a derived (version 5, system) id": """
        SELECT id, tenant_id FROM accounts WHERE kind = 'customer' AND substr(id::text, 15, 1) = '5'
    """,
    "a reversal mirrors an existing transaction of its tenant, not a reversal, and moves no more than it did": """
        SELECT r.tenant_id, r.reverses, o.kind, sum(e.amount), (
            SELECT sum(oe.amount) FROM entries oe WHERE oe.transaction_id = o.id AND oe.amount > 0
        ) AS original
        FROM transactions r JOIN entries e ON e.transaction_id = r.id AND e.amount > 0
        LEFT JOIN transactions o ON o.id = r.reverses AND o.tenant_id = r.tenant_id
        WHERE r.reverses IS NOT NULL
        GROUP BY r.tenant_id, r.reverses, o.id, o.kind
        HAVING o.id IS NULL OR o.kind = 'reversal' OR sum(e.amount) > (
            SELECT sum(oe.amount) FROM entries oe WHERE oe.transaction_id = o.id AND oe.amount > 0
        )
    """,
    "pending debits and credits are the sums of the pending holds from and toward each account": """
        SELECT a.tenant_id, a.id, a.pending_debits, coalesce(d.held, 0), a.pending_credits, coalesce(c.held, 0)
        FROM accounts a
        LEFT JOIN (SELECT tenant_id, source_id, sum(amount) AS held FROM holds WHERE status = 'pending'
                   GROUP BY tenant_id, source_id) d ON d.tenant_id = a.tenant_id AND d.source_id = a.id
        LEFT JOIN (SELECT tenant_id, destination_id, sum(amount) AS held FROM holds WHERE status = 'pending'
                   GROUP BY tenant_id, destination_id) c ON c.tenant_id = a.tenant_id AND c.destination_id = a.id
        WHERE a.pending_debits <> coalesce(d.held, 0) OR a.pending_credits <> coalesce(c.held, 0)
    """,
    "a captured hold posted one capture of at most its amount, from its source to its destination": """
        SELECT h.tenant_id, h.id, h.amount, h.captured_amount, t.kind
        FROM holds h LEFT JOIN transactions t ON t.id = h.capture_transaction_id AND t.tenant_id = h.tenant_id
        WHERE h.status = 'captured' AND (
            t.id IS NULL OR t.kind <> 'capture' OR h.captured_amount > h.amount
            OR NOT EXISTS (SELECT 1 FROM entries e WHERE e.transaction_id = t.id AND e.account_id = h.source_id
                           AND e.amount = -h.captured_amount)
            OR NOT EXISTS (SELECT 1 FROM entries e WHERE e.transaction_id = t.id AND e.account_id = h.destination_id
                           AND e.amount = h.captured_amount))
    """,
    "every posting has exactly one settled operation and idempotency key": """
        SELECT t.id, t.operation_id, k.status FROM transactions t
        LEFT JOIN idempotency_keys k ON k.operation_id = t.operation_id
        WHERE k.status IS DISTINCT FROM 'succeeded'
    """,
}


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    row: tuple[object, ...]

    def __str__(self) -> str:
        return f"{self.check}: {self.row}"


def verify(conn: Connection[TupleRow]) -> list[Violation]:
    """Every violation found; an empty list means the books are sound."""
    violations: list[Violation] = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for name, query in CHECKS.items():
            rows = conn.execute(f"SELECT * FROM ({query}) v LIMIT {MAX_REPORTED}").fetchall()
            violations.extend(Violation(name, tuple(row)) for row in rows)
        # Derived ids are computed here, not in SQL: one row per tenant and currency, few.
        system = conn.execute("SELECT id, tenant_id, currency FROM accounts WHERE kind = 'system'").fetchall()
        misplaced = [row for row in system if row[0] != external_account_id(str(row[1]), str(row[2]))]
        violations.extend(Violation(SYSTEM_IDS, tuple(row)) for row in misplaced[:MAX_REPORTED])
    return violations
