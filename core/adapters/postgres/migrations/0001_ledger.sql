-- Ledger core: accounts, append-only transactions and entries, idempotency keys, operations, outbox.
-- Amounts are BIGINT minor units; the application caps them (MAX_POSTING_AMOUNT, MAX_BALANCE) far
-- below BIGINT's range, and the CHECKs below enforce the same caps in the database.

CREATE TABLE accounts (
    id              uuid PRIMARY KEY,
    tenant_id       text        NOT NULL CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    currency        char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    kind            text        NOT NULL CHECK (kind IN ('customer', 'system')),
    system_role     text        CHECK ((kind = 'system') = (system_role IS NOT NULL)),
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'frozen', 'closed')),
    -- NULL: unrestricted (system accounts). 0: debits must not exceed credits. n: may go down to -n.
    overdraft_limit bigint      CHECK (overdraft_limit >= 0),
    posted_balance  bigint      NOT NULL DEFAULT 0 CHECK (abs(posted_balance) <= 4611686018427387904),
    version         bigint      NOT NULL DEFAULT 0 CHECK (version >= 0),  -- entries posted so far
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (overdraft_limit IS NULL OR posted_balance >= -overdraft_limit)
);
CREATE INDEX accounts_tenant_idx ON accounts (tenant_id, id);
CREATE UNIQUE INDEX accounts_system_role_idx ON accounts (tenant_id, currency, system_role)
    WHERE kind = 'system';

CREATE TABLE transactions (
    id              uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('credit', 'debit', 'transfer')),
    operation_id    uuid        NOT NULL UNIQUE,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL
);

CREATE TABLE entries (
    transaction_id  uuid        NOT NULL REFERENCES transactions (id),
    account_id      uuid        NOT NULL REFERENCES accounts (id),
    sequence        bigint      NOT NULL CHECK (sequence > 0),  -- 1, 2, 3... per account
    amount          bigint      NOT NULL CHECK (amount <> 0 AND abs(amount) < 1000000000000000),
    currency        char(3)     NOT NULL,
    balance_after   bigint      NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (account_id, sequence)
);
-- Keyset pagination by time, newest or oldest first, with an optional time range: one index range scan
-- whose cost depends on the page size, not on the account's history.
CREATE INDEX entries_account_time_idx ON entries (account_id, created_at, sequence);
CREATE INDEX entries_transaction_idx ON entries (transaction_id);

-- What was asked: one row per accepted command, the polling resource's identity.
CREATE TABLE operations (
    id              uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    command_type    text        NOT NULL,
    request         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_tenant_idx ON operations (tenant_id, id);

-- Exactly-once: (tenant, key) is claimed once; the settled outcome is stored here and replayed.
CREATE TABLE idempotency_keys (
    tenant_id       text        NOT NULL,
    key             text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint     text        NOT NULL,  -- SHA-256 of the canonical command
    operation_id    uuid        NOT NULL UNIQUE REFERENCES operations (id),
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    response        jsonb,                 -- {"result": ...} or {"problem": ...} once settled
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    PRIMARY KEY (tenant_id, key),
    CHECK ((status = 'pending') = (response IS NULL))
);

-- Transactional outbox: staged in the posting's transaction, published by the relay after commit.
CREATE TABLE outbox (
    position        bigserial PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    tenant_id       text        NOT NULL,
    payload         jsonb       NOT NULL,
    occurred_at     timestamptz NOT NULL,
    published_at    timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (position) WHERE published_at IS NULL;

-- The books are append-only: history is corrected by new postings, never by editing old ones.
CREATE FUNCTION reject_ledger_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_mutation();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_mutation();
CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_mutation();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_mutation();
