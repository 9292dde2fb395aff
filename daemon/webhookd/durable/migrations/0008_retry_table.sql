-- The retry table under churn: a receiver down for an hour leaves a million pending rows, and every claim, settle
-- and sweep must stay as cheap with them as without them.
--
-- Writers wait from here to the commit (SHARE ROW EXCLUSIVE lets reads through): the indexes are built and the
-- pending rows counted while no row can change. Each CREATE INDEX reads the whole table once; where the table is
-- large, create them beforehand with CREATE INDEX CONCURRENTLY and the same definitions, and these find them made.
LOCK TABLE webhookd.deliveries IN SHARE ROW EXCLUSIVE MODE;

-- A claim changes only locked_until, which no index holds, so that it can be a HOT update: no new index entries, the
-- old version pruned from its page without VACUUM. That needs room on the page for the new versions, and a claim
-- takes a batch of rows that were written together, every row of a page at once: half of each page is left free for
-- them. Measured at a million pending rows, a batch claim is HOT for every row at 50 and for about half of them at
-- 70 (100: none), and takes half the time. This applies to pages written from now on; pages already full fill up
-- again as their rows leave.
ALTER TABLE webhookd.deliveries SET (fillfactor = 50);

-- Each endpoint's pending rows by when they fall due: claims around endpoints that take nothing now (an open
-- circuit, a pause, a busy host) jump from one endpoint to the next instead of walking the rows they skip.
CREATE INDEX IF NOT EXISTS deliveries_due_by_webhook
    ON webhookd.deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
-- The pending rows of each ordered record that are not waiting for the one before them: a record's claimed row is
-- among them, found without reading the queue behind it.
CREATE INDEX IF NOT EXISTS deliveries_in_order_active
    ON webhookd.deliveries (webhook_id, order_key)
    WHERE status = 'pending' AND order_key IS NOT NULL AND next_attempt_at < 'infinity';
-- Those waiting ('infinity'), for the sweep that wakes a record whose wake-up was lost.
CREATE INDEX IF NOT EXISTS deliveries_in_order_waiting
    ON webhookd.deliveries (webhook_id, order_key, order_pos, id)
    WHERE status = 'pending' AND next_attempt_at = 'infinity';
-- Delivered rows go after endpoints.attempt_log_retention_seconds, oldest first; dead letters stay.
CREATE INDEX IF NOT EXISTS deliveries_delivered
    ON webhookd.deliveries (delivered_at) WHERE status = 'delivered';

-- webhookd_retry_queue_depth without counting a million rows: the pending rows, kept by the triggers below in the
-- transaction of every change, whoever makes it (an older daemon, an operator's command). A writer adds to a shard
-- no other transaction holds, so writers never queue on one row and never deadlock on it; the gauge adds them up.
CREATE TABLE IF NOT EXISTS webhookd.pending_count (
    shard   integer PRIMARY KEY,
    pending bigint  NOT NULL
) WITH (fillfactor = 50);
INSERT INTO webhookd.pending_count (shard, pending)
SELECT s, CASE WHEN s = 0 THEN (SELECT count(*) FROM webhookd.deliveries WHERE status = 'pending') ELSE 0 END
FROM generate_series(0, 31) AS s
ON CONFLICT (shard) DO NOTHING;

-- Statement-level, from the transition tables: one shard update per statement, however many rows it changed.
-- SECURITY DEFINER: it writes the counter as its owner, so no writer of the deliveries needs a grant on it.
CREATE OR REPLACE FUNCTION webhookd.count_pending() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    delta bigint;
    mine  integer := pg_backend_pid() % 32;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE webhookd.pending_count SET pending = 0;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO delta FROM new_rows WHERE status = 'pending';
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT (SELECT count(*) FROM new_rows WHERE status = 'pending')
             - (SELECT count(*) FROM old_rows WHERE status = 'pending') INTO delta;
    ELSE
        SELECT -count(*) INTO delta FROM old_rows WHERE status = 'pending';
    END IF;
    IF delta = 0 THEN
        RETURN NULL;
    END IF;
    -- This backend's own shard, unless another transaction holds it (ours is never skipped); then the next free one.
    UPDATE webhookd.pending_count SET pending = pending + delta
    WHERE shard = (SELECT c.shard FROM webhookd.pending_count c WHERE c.shard = mine FOR UPDATE SKIP LOCKED);
    IF NOT FOUND THEN
        UPDATE webhookd.pending_count SET pending = pending + delta
        WHERE shard = (
            SELECT c.shard FROM webhookd.pending_count c ORDER BY (c.shard + 32 - mine) % 32
            LIMIT 1 FOR UPDATE SKIP LOCKED
        );
        IF NOT FOUND THEN
            -- Every shard is taken: wait for this backend's own.
            UPDATE webhookd.pending_count SET pending = pending + delta WHERE shard = mine;
        END IF;
    END IF;
    RETURN NULL;
END $$;

DO $create$ BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_trigger WHERE tgrelid = 'webhookd.deliveries'::regclass AND tgname = 'webhookd_count_inserted'
    ) THEN
        CREATE TRIGGER webhookd_count_inserted AFTER INSERT ON webhookd.deliveries
            REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION webhookd.count_pending();
        CREATE TRIGGER webhookd_count_updated AFTER UPDATE ON webhookd.deliveries
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION webhookd.count_pending();
        CREATE TRIGGER webhookd_count_deleted AFTER DELETE ON webhookd.deliveries
            REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION webhookd.count_pending();
        CREATE TRIGGER webhookd_count_truncated AFTER TRUNCATE ON webhookd.deliveries
            FOR EACH STATEMENT EXECUTE FUNCTION webhookd.count_pending();
    END IF;
END $create$;
