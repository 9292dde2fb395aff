-- The daemon's own state. The subscriptions table (Twenty's layout) is created separately, and only where it is
-- missing, because in a Twenty database it belongs to Twenty.

CREATE TABLE IF NOT EXISTS webhookd.deliveries (
    id               bigserial PRIMARY KEY,
    event_id         text        NOT NULL,
    webhook_id       uuid        NOT NULL,
    workspace_id     uuid        NOT NULL,
    event_name       text        NOT NULL,
    body             bytea       NOT NULL,
    -- When the event happened according to Kafka, for the end-to-end latency metric of a late success.
    event_time       timestamptz,
    source           text        NOT NULL,  -- topic:partition:offset the event came from
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A claim is a lease, not a held row lock: a replica that dies mid-attempt frees its claims when they expire.
    locked_until     timestamptz,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    -- A record consumed twice (after a crash) must not schedule its deliveries twice; the source is part of the
    -- key because default ids (topic:partition:offset) repeat when a topic is recreated.
    UNIQUE (event_id, webhook_id, source)
);

CREATE INDEX IF NOT EXISTS deliveries_due
    ON webhookd.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_by_webhook
    ON webhookd.deliveries (webhook_id, status, updated_at);

CREATE TABLE IF NOT EXISTS webhookd.bad_events (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    reason      text        NOT NULL,
    raw         bytea       NOT NULL,  -- capped; raw_size keeps the real length
    raw_size    integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, "partition", "offset")
);
