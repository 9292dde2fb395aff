-- Per-webhook options (filters, per-record ordering, custom headers), kept beside Twenty's table rather than in it:
-- core.webhook belongs to Twenty and has no column for them. `webhookd webhooks set` writes a row; running daemons
-- read it with the webhook's row, told by the same notification channel as a subscription change.

CREATE TABLE IF NOT EXISTS webhookd.webhook_options (
    webhook_id uuid        PRIMARY KEY,
    -- {"filter": {"updated_fields": [...], "where": ["stage in [WON, LOST]", ...]}, "ordered": true,
    --  "headers": {"Authorization": "Bearer ..."}}; header values may be secrets, like core.webhook's secret.
    options    jsonb       NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION webhookd.notify_options_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- The subscriptions channel: a listener rereads the webhook's row, options included.
    PERFORM pg_notify('webhookd_subscriptions', COALESCE(NEW.webhook_id, OLD.webhook_id)::text);
    RETURN NULL;
END $$;

DO $create$ BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_trigger
        WHERE tgrelid = 'webhookd.webhook_options'::regclass AND tgname = 'webhookd_options_change'
    ) THEN
        CREATE TRIGGER webhookd_options_change
            AFTER INSERT OR UPDATE OR DELETE ON webhookd.webhook_options
            FOR EACH ROW EXECUTE FUNCTION webhookd.notify_options_change();
    END IF;
END $create$;

-- Per-record ordering: the record a delivery of an ordered webhook belongs to ("<object>:<record id>"; the webhook
-- fixes the workspace) and its event's place in Kafka (the offset: a record's events share a partition). Of a
-- record's pending rows, the retry path claims only the earliest by place, and only while none of them is claimed.
-- A row written behind an earlier pending one waits with next_attempt_at 'infinity' until the one before it settles
-- (`record`, `retries`), so that the claims never walk past a long queue of rows that may not go yet.
ALTER TABLE webhookd.deliveries ADD COLUMN IF NOT EXISTS order_key text;
ALTER TABLE webhookd.deliveries ADD COLUMN IF NOT EXISTS order_pos bigint;
CREATE INDEX IF NOT EXISTS deliveries_in_order
    ON webhookd.deliveries (webhook_id, order_key, order_pos, id) WHERE status = 'pending' AND order_key IS NOT NULL;

-- Where each attempted event came from (topic:partition:offset), so that `deliveries replay` can read a first-try
-- success again from Kafka: about 30 bytes an attempt instead of the body's kilobytes. Older daemons, which do not
-- write it, leave it NULL.
ALTER TABLE webhookd.attempts ADD COLUMN IF NOT EXISTS source text;
