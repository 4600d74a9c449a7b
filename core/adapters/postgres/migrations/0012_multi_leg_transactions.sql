-- POST /v1/transactions: one transaction of up to 100 legs across accounts and currencies, each currency summing
-- to zero. Its kind is `multi_leg`. The new check is added NOT VALID and then validated, so existing rows are
-- scanned without blocking writers for the scan.
ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
    CHECK (kind IN ('credit', 'debit', 'transfer', 'multi_leg')) NOT VALID;
ALTER TABLE transactions VALIDATE CONSTRAINT transactions_kind_check;
