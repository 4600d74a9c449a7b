-- This database's identity. Redis caches `(tenant, Idempotency-Key) -> operation` under it: a database that
-- is dropped and created again gets a new id, so the ingress can never answer from a cache entry for an
-- operation the database does not hold. (A restored backup keeps its id along with the operations.)
CREATE TABLE ledger_instance (
    id          uuid        PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    singleton   boolean     NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);
INSERT INTO ledger_instance (id) VALUES (gen_random_uuid());
