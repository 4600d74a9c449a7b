-- API keys: a tenant's credentials. Only a SHA-256 of the secret is stored; the secret is shown once.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   text        NOT NULL CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text        NOT NULL DEFAULT '',
    prefix      text        NOT NULL,            -- the secret's first characters, to tell keys apart
    key_hash    text        NOT NULL UNIQUE,     -- hex SHA-256 of the whole secret
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

-- When the command of a pending operation was last handed to RabbitMQ: the redelivery sweeper
-- re-enqueues pending operations whose command may never have reached the broker (ingress died between
-- recording and publishing). Workers settle each operation once, so a second copy is harmless.
ALTER TABLE operations ADD COLUMN last_enqueued_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX idempotency_keys_pending_idx ON idempotency_keys (created_at) WHERE status = 'pending';
