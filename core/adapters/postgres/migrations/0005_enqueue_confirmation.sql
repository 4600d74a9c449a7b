-- `last_enqueued_at` is now set only once RabbitMQ has confirmed the command (NULL: recorded, not yet
-- confirmed). A duplicate request that finds a pending, unconfirmed operation is told to come back
-- (409 idempotency-key-in-use) instead of being handed an operation id that a failed publish may still
-- withdraw; the redelivery sweeper treats a long-unconfirmed operation like a long-pending one.
ALTER TABLE operations ALTER COLUMN last_enqueued_at DROP NOT NULL;
ALTER TABLE operations ALTER COLUMN last_enqueued_at DROP DEFAULT;
