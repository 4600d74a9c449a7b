-- The posting's `SELECT ... WHERE id = ANY(ids) AND tenant_id = t FOR UPDATE` was planned on
-- (tenant_id, id) with `id` as a mere filter: it walked every account of the tenant, and under SERIALIZABLE
-- reading more than two rows of a heap page turns the predicate lock into a page lock. Every posting of the
-- tenant then conflicted with every other one writing to that page. No query lists a tenant's accounts,
-- so the index goes and the lookup uses the primary key: tuple-level locks on exactly the rows it posts to.
DROP INDEX accounts_tenant_idx;
