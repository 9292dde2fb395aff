-- Secret rotation without touching Twenty's table: when a webhook's secret changes, the subscriptions trigger keeps
-- the old one here, and deliveries are signed with both until `delivery.secret_rotation_overlap_seconds` has passed.

CREATE TABLE IF NOT EXISTS webhookd.previous_secrets (
    webhook_id  uuid        PRIMARY KEY,
    secret      text        NOT NULL,
    replaced_at timestamptz NOT NULL DEFAULT now()
);
