-- cleanledger: no transaction
-- GET /v1/accounts: a tenant's accounts in creation order (keyset pagination on (created_at, id)), filtered
-- by currency and status on the same index, and by metadata through a GIN index (`metadata @> {...}`: values
-- are strings, so equality is exact). Built CONCURRENTLY: on a live ledger neither blocks the postings.
-- The posting path locks accounts by primary key alone (`WHERE id = ANY(...)`), so the tenant index cannot
-- widen its predicate locks again (see 0006).
CREATE INDEX CONCURRENTLY IF NOT EXISTS accounts_tenant_created_idx ON accounts (tenant_id, created_at, id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS accounts_metadata_idx ON accounts USING gin (metadata jsonb_path_ops);
