-- The attempt log, in the database of postgres.attempts_dsn (postgres.dsn's when unset): three tables partitioned by
-- day, so that retention drops a whole day at once, at the cost of a catalog change, instead of deleting rows one
-- by one and leaving the vacuum a table's worth of dead rows to clean up (see durable/attempts.py for which row goes
-- where). A day, not an hour: lookups by event id probe one index per partition, about 15 at the default 14 days of
-- retention against 340 by hour, and a partition kept a day past the retention costs a fourteenth more space.
--
-- The index set is the smallest that answers what operators ask: a hash index by event id (`deliveries show
-- --event`; a 4-byte hash per row instead of the whole id), a btree by webhook and time (`deliveries list
-- --webhook`, `deliveries replay`), and a BRIN index by time (`deliveries list`, newest first), a few pages a
-- partition because rows arrive in time order.

-- Every attempt in full: failures and retries always, first-try successes with endpoints.attempt_log 'full', and
-- the pairs a webhook's filter kept back (attempt 0, result 'filtered').
CREATE TABLE IF NOT EXISTS webhookd.attempt_log (
    event_id     text        NOT NULL,
    webhook_id   uuid        NOT NULL,
    workspace_id uuid        NOT NULL,
    event_name   text        NOT NULL,
    attempt      integer     NOT NULL,
    at           timestamptz NOT NULL,
    duration_ms  real        NOT NULL,
    result       text        NOT NULL,  -- the webhookd_delivery_attempts_total label: 2xx, timeout, ... or filtered
    status       integer,
    error        text,                  -- capped excerpt of the response or the error
    source       text,                  -- topic:partition:offset of the event, for `deliveries replay`
    -- The delivery's row in webhookd.deliveries, which lives in the other database when attempts_dsn is set; NULL
    -- for an attempt of the live path. A first-try success without one has no row to be listed from.
    row_id       bigint
) PARTITION BY RANGE (at);
CREATE INDEX IF NOT EXISTS attempt_log_by_event ON webhookd.attempt_log USING hash (event_id);
CREATE INDEX IF NOT EXISTS attempt_log_by_webhook ON webhookd.attempt_log (webhook_id, at);
CREATE INDEX IF NOT EXISTS attempt_log_by_time ON webhookd.attempt_log USING brin (at);

-- First-try successes with endpoints.attempt_log 'compact': what `deliveries show` and `deliveries replay` need.
CREATE TABLE IF NOT EXISTS webhookd.first_tries (
    event_id    text        NOT NULL,
    webhook_id  uuid        NOT NULL,
    source      text,
    at          timestamptz NOT NULL,
    duration_ms real        NOT NULL,
    status      smallint    NOT NULL
) PARTITION BY RANGE (at);
CREATE INDEX IF NOT EXISTS first_tries_by_event ON webhookd.first_tries USING hash (event_id);
CREATE INDEX IF NOT EXISTS first_tries_by_webhook ON webhookd.first_tries (webhook_id, at);
CREATE INDEX IF NOT EXISTS first_tries_by_time ON webhookd.first_tries USING brin (at);

-- With endpoints.attempt_log 'aggregate': first-try successes and filtered pairs counted per webhook and minute, a
-- row per process that saw them (readers add them up).
CREATE TABLE IF NOT EXISTS webhookd.attempt_counts (
    minute          timestamptz      NOT NULL,
    webhook_id      uuid             NOT NULL,
    result          text             NOT NULL,  -- 2xx or filtered
    attempts        integer          NOT NULL,
    duration_ms     double precision NOT NULL,  -- the sum, for the mean
    max_duration_ms real             NOT NULL
) PARTITION BY RANGE (minute);
CREATE INDEX IF NOT EXISTS attempt_counts_by_webhook ON webhookd.attempt_counts (webhook_id, minute);

-- Creates the partitions from yesterday (unless the retention is over by then) to `days_ahead` days from now and
-- drops those wholly older than the retention; returns how many of each. Called by every daemon every few minutes,
-- by a write that finds no partition for its day, and by `webhookd migrate`; one at a time, the others waiting for
-- it. SECURITY DEFINER: the daemon's own role may create and drop nothing, so this runs as the role that migrated,
-- which owns the tables; the arguments are bounded, so that no caller can drop the last hour or make years of
-- partitions. The lock timeout keeps a drop or a creation, which lock the parent table, from queueing the log's
-- writers behind a long query for more than a moment; what could not be done is done on the next call.
CREATE OR REPLACE FUNCTION webhookd.keep_attempt_partitions(
    retention double precision, days_ahead integer, OUT created integer, OUT dropped integer
) LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' AS $$
DECLARE
    parent text;
    ahead  integer;
    day    date;
    child  text;
    today  date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    created := 0;
    dropped := 0;
    retention := greatest(retention, 3600);
    PERFORM pg_advisory_xact_lock(7765626801);
    FOREACH parent IN ARRAY ARRAY['attempt_log', 'first_tries', 'attempt_counts'] LOOP
        FOR ahead IN -1..least(greatest(days_ahead, 1), 7) LOOP
            day := today + ahead;
            child := parent || '_' || to_char(day, 'YYYYMMDD');
            -- A day the retention is already over for would be dropped below, again at every call.
            IF to_regclass('webhookd.' || child) IS NULL
               AND (day + 1)::timestamp AT TIME ZONE 'UTC' > now() - make_interval(secs => retention) THEN
                EXECUTE format(
                    'CREATE TABLE webhookd.%I PARTITION OF webhookd.%I FOR VALUES FROM (%L) TO (%L)',
                    child, parent, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
                );
                created := created + 1;
            END IF;
        END LOOP;
        -- A partition's name carries its day; it ends at the next midnight (UTC).
        FOR child IN
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = ('webhookd.' || parent)::regclass
              AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                  <= now() - make_interval(secs => retention)
        LOOP
            EXECUTE format('DROP TABLE webhookd.%I', child);
            dropped := dropped + 1;
        END LOOP;
    END LOOP;
END $$;
