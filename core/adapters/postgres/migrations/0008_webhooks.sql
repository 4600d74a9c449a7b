-- Webhooks: a tenant's endpoints, one delivery per (endpoint, event), and every attempt at it.

CREATE TABLE webhook_endpoints (
    id           uuid PRIMARY KEY,
    tenant_id    text        NOT NULL CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    url          text        NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    event_types  text[]      NOT NULL CHECK (cardinality(event_types) >= 1),  -- '*' stands for every type
    description  text        NOT NULL DEFAULT '',
    -- In clear: HMAC signing needs it. Never returned by the API after creation or a roll, never logged.
    secret       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    secret_rolled_at timestamptz,
    deleted_at   timestamptz
);
-- Fan-out looks up a tenant's live endpoints; listings page by id.
CREATE INDEX webhook_endpoints_tenant_idx ON webhook_endpoints (tenant_id, id) WHERE deleted_at IS NULL;

CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    endpoint_id     uuid        NOT NULL REFERENCES webhook_endpoints (id),
    tenant_id       text        NOT NULL,
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,  -- the event document, as the body carries it
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),  -- while pending: when it is due (or its lease ends)
    expires_at      timestamptz NOT NULL,                -- retries stop after this: the delivery fails
    last_status     int,                                 -- HTTP status of the last attempt, if any
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    UNIQUE (endpoint_id, event_id)  -- an event delivered twice to the fan-out never duplicates a delivery
);
-- The due-deliveries scan: pending only, the endpoints with something due, then each one's oldest due first.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint_due_idx ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
-- An endpoint's deliveries, newest first.
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);

CREATE TABLE webhook_attempts (
    delivery_id  uuid        NOT NULL REFERENCES webhook_deliveries (id),
    attempt      int         NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code  int,          -- NULL: no HTTP answer (timeout, connection refused, address refused)
    latency_ms   int         NOT NULL,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);

-- GET /v1/events: a tenant's events in outbox order.
CREATE INDEX outbox_tenant_position_idx ON outbox (tenant_id, position);
