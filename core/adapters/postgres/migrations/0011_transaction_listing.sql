-- cleanledger: no transaction
-- GET /v1/transactions: a tenant's transactions in time order (keyset pagination on (created_at, id)), by
-- kind on the same index, by metadata through a GIN index; by account through entries_account_time_idx.
-- Built CONCURRENTLY: every posting inserts here, and a plain CREATE INDEX would hold them all up.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_tenant_created_idx ON transactions (tenant_id, created_at, id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_metadata_idx ON transactions USING gin (metadata jsonb_path_ops);
