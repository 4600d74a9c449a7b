-- POST /v1/batches: one operation posts up to 1,000 transactions, one per item. The guard that an operation
-- posts at most once becomes: at most once per item, and once for an operation that is not a batch (NULLS NOT
-- DISTINCT: a NULL item is one value, so two non-batch transactions of one operation still collide).
ALTER TABLE transactions ADD COLUMN batch_item integer CHECK (batch_item >= 0);
ALTER TABLE transactions ADD CONSTRAINT transactions_operation_item_key UNIQUE NULLS NOT DISTINCT (operation_id, batch_item);
ALTER TABLE transactions DROP CONSTRAINT transactions_operation_id_key;
