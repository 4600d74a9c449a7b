-- The documents the ledger stores whole and only ever reads back whole: an operation's request, a key's settled
-- response, an event's payload. No query looks inside them, so they are `json` (the text, checked) rather than
-- `jsonb` (parsed into a binary tree on the way in, printed back on the way out): a batch's request, response and
-- event are 150 to 450 KB each, and building their jsonb cost a fifth of a batch's time in PostgreSQL
-- (pg_stat_statements, bench/batches.py). `json` also keeps the request exactly as accepted.
ALTER TABLE operations ALTER COLUMN request TYPE json USING request::json;
ALTER TABLE idempotency_keys ALTER COLUMN response TYPE json USING response::json;
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;
