-- The same documents (0017) are compressed with lz4 rather than pglz, PostgreSQL's default: a batch's 450 KB
-- event took 19 ms to insert, most of it compressing (pg_stat_statements, bench/batches.py). New values only;
-- values already stored stay as they are, and both read back alike.
ALTER TABLE operations ALTER COLUMN request SET COMPRESSION lz4;
ALTER TABLE idempotency_keys ALTER COLUMN response SET COMPRESSION lz4;
ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
