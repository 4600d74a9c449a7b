-- cleanledger: no transaction
-- GET /v1/operations: a tenant's operations in the order they were accepted (keyset pagination on
-- (created_at, operation_id)), filtered by status on the same index, for reconciliation. Built CONCURRENTLY:
-- every accepted command inserts here, and a plain CREATE INDEX would hold them all up.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idempotency_keys_tenant_created_idx
    ON idempotency_keys (tenant_id, created_at, operation_id);
