-- Holds (two-phase postings): POST /v1/holds reserves an amount from a source account toward a destination;
-- capture posts all or part of it, void or expiry releases it. While a hold is pending its amount counts in the
-- source's `pending_debits` and the destination's `pending_credits`, and the overdraft rule applies to what is
-- available: posted balance minus pending debits. Both columns are changed with the balance, under the
-- accounts' locks, so they never disagree with the holds table (`cleanledger verify` checks it).
ALTER TABLE accounts ADD COLUMN pending_debits bigint NOT NULL DEFAULT 0 CHECK (pending_debits >= 0);
ALTER TABLE accounts ADD COLUMN pending_credits bigint NOT NULL DEFAULT 0 CHECK (pending_credits >= 0);
ALTER TABLE accounts ADD CONSTRAINT accounts_available_check
    CHECK (overdraft_limit IS NULL OR posted_balance - pending_debits >= -overdraft_limit);

CREATE TABLE holds (
    tenant_id       text        NOT NULL,
    id              uuid        NOT NULL,
    source_id       uuid        NOT NULL,
    destination_id  uuid        NOT NULL,
    currency        char(3)     NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0 AND amount < 1000000000000000),
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    captured_amount bigint      CHECK (captured_amount > 0 AND captured_amount <= amount),
    capture_transaction_id uuid,
    expires_at      timestamptz,
    operation_id    uuid        NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id),
    CHECK (source_id <> destination_id),
    CHECK ((status = 'captured') = (capture_transaction_id IS NOT NULL AND captured_amount IS NOT NULL))
);
-- The expiry sweep: pending holds in expiry order, and nothing else.
CREATE INDEX holds_expiry_idx ON holds (expires_at) WHERE status = 'pending' AND expires_at IS NOT NULL;
-- Holds are settled history like entries: their status changes, their rows are never deleted.
CREATE TRIGGER holds_never_deleted BEFORE DELETE ON holds FOR EACH ROW EXECUTE FUNCTION reject_ledger_mutation();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_mutation();

-- A captured hold posts a transaction of its own kind.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
    CHECK (kind IN ('credit', 'debit', 'transfer', 'multi_leg', 'reversal', 'capture')) NOT VALID;
ALTER TABLE transactions VALIDATE CONSTRAINT transactions_kind_check;
