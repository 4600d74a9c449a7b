-- POST /v1/transactions/{id}/reverse: a reversal is a transaction of its own (kind `reversal`) that mirrors
-- another one of the tenant's, in full or in part, and names it in `reverses`. What has been reversed of a
-- transaction is read back through the partial index below, under the same account locks as the reversal
-- that reads it, so two reversals of one transaction queue and the second sees the first.
ALTER TABLE transactions ADD COLUMN reverses uuid;
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
    CHECK (kind IN ('credit', 'debit', 'transfer', 'multi_leg', 'reversal')) NOT VALID;
ALTER TABLE transactions VALIDATE CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_reversal_check CHECK ((kind = 'reversal') = (reverses IS NOT NULL));
CREATE INDEX transactions_reverses_idx ON transactions (tenant_id, reverses) WHERE reverses IS NOT NULL;
