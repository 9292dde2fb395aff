-- Endpoint health: what every replica learned about each webhook's receiver, merged here, and the operator's
-- settings for it. Keyed by webhook id because that is what operators name; rows appear on a webhook's first attempt
-- or when an operator sets something on it.

CREATE TABLE IF NOT EXISTS webhookd.endpoints (
    webhook_id            uuid        PRIMARY KEY,
    target_url            text,       -- as last attempted, shown without credentials, path or query
    last_success_at       timestamptz,
    last_failure_at       timestamptz,
    -- The first failure after the last success: the clock of auto-disable.
    failing_since         timestamptz,
    consecutive_failures  integer     NOT NULL DEFAULT 0,
    attempts_total        bigint      NOT NULL DEFAULT 0,
    failures_total        bigint      NOT NULL DEFAULT 0,
    last_status           integer,
    last_error            text,
    -- Runtime state published by the daemons, for `webhookd endpoints list`.
    circuit_open_until    timestamptz,
    rate_limited_until    timestamptz,
    disabled_at           timestamptz,
    disabled_reason       text,
    enabled_at            timestamptz,  -- failures before this moment no longer count towards auto-disable
    -- Deliveries a second this endpoint may receive; NULL takes endpoints.rate_limit_per_second.
    rate_limit_per_second double precision CHECK (rate_limit_per_second > 0),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS endpoints_by_update ON webhookd.endpoints (updated_at);

-- Every HTTP attempt, written in batches with COPY; pruned after endpoints.attempt_log_retention_seconds.
CREATE TABLE IF NOT EXISTS webhookd.attempts (
    event_id     text        NOT NULL,
    webhook_id   uuid        NOT NULL,
    workspace_id uuid        NOT NULL,
    event_name   text        NOT NULL,
    attempt      integer     NOT NULL,
    at           timestamptz NOT NULL,
    duration_ms  real        NOT NULL,
    result       text        NOT NULL,  -- the webhookd_delivery_attempts_total label: 2xx, timeout, ...
    status       integer,
    error        text                   -- capped excerpt of the response or the error
);
CREATE INDEX IF NOT EXISTS attempts_by_delivery ON webhookd.attempts (event_id, webhook_id, at);
CREATE INDEX IF NOT EXISTS attempts_by_time ON webhookd.attempts (at);
CREATE INDEX IF NOT EXISTS attempts_by_webhook ON webhookd.attempts (webhook_id, at);
