-- Account ids are scoped per tenant: an account is (tenant_id, id). With a global key, a client-chosen id that
-- another tenant already held answered `account-exists`, so any tenant could confirm that someone else's
-- account id exists. Now two tenants may hold the same id, and each sees only its own.
--
-- Entries carry their account's tenant, so an entry names its account fully and every read of an account's
-- history stays one descent of an index led by (tenant_id, account_id): another tenant that chose the same
-- id cannot slow it down, however many entries it posts.
ALTER TABLE accounts DROP CONSTRAINT accounts_pkey;
ALTER TABLE accounts ADD PRIMARY KEY (tenant_id, id);

ALTER TABLE entries ADD COLUMN tenant_id text;
-- Filling the new column is the one edit of history ever made, and it changes no amount: the append-only
-- trigger is lifted for this statement alone, inside this migration's transaction.
ALTER TABLE entries DISABLE TRIGGER entries_append_only;
UPDATE entries e SET tenant_id = t.tenant_id FROM transactions t WHERE t.id = e.transaction_id;
ALTER TABLE entries ENABLE TRIGGER entries_append_only;
ALTER TABLE entries ALTER COLUMN tenant_id SET NOT NULL;
ALTER TABLE entries DROP CONSTRAINT entries_pkey;
ALTER TABLE entries ADD PRIMARY KEY (tenant_id, account_id, sequence);
DROP INDEX entries_account_time_idx;
CREATE INDEX entries_account_time_idx ON entries (tenant_id, account_id, created_at, sequence);
