-- What every process of the cluster shares so that limits mean the same whatever the number of replicas and
-- workers: each endpoint's rate-limit schedule (webhookd.pacing) and the processes alive (webhookd.members).
--
-- Both tables are UNLOGGED: their rows are rewritten several times a second and are worth nothing after a crash
-- (an emptied schedule allows one burst, an emptied member list is refilled by the next heartbeats), so they write
-- no WAL, a lease commits without waiting for a WAL flush, and logical replication (Debezium's publication FOR ALL
-- TABLES) never carries them. fillfactor leaves room on each page for updates that touch no index (HOT).

CREATE UNLOGGED TABLE IF NOT EXISTS webhookd.pacing (
    -- SHA-256 of the endpoint's target URL: never the URL itself, whose path or query may hold a token.
    endpoint_key bytea       PRIMARY KEY,
    -- Theoretical arrival time: where the endpoint's schedule stands, every slot before it leased to some process.
    tat          timestamptz NOT NULL
) WITH (fillfactor = 50);

-- Lease `wanted` slots of an endpoint paced at `rate` a second, in one round trip: the slots go from the schedule's
-- end (or `burst` seconds ago, for an endpoint that has been idle), 1/rate apart, if the first of them starts within
-- `horizon` seconds; otherwise none, so the schedule never runs further ahead than the horizon and one lease. Returns
-- how many were leased and when the first one is, in seconds from now as Postgres sees it (negative within the
-- burst), so the callers' clocks never matter; with none leased, `start_in` is when the next free slot is.
CREATE OR REPLACE FUNCTION webhookd.pace_lease(
    key bytea, wanted integer, rate double precision, burst double precision, horizon double precision,
    OUT granted integer, OUT start_in double precision
) LANGUAGE plpgsql AS $$
DECLARE
    tat timestamptz;
    at  timestamptz;
BEGIN
    SELECT p.tat INTO tat FROM webhookd.pacing p WHERE p.endpoint_key = key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO webhookd.pacing (endpoint_key, tat) VALUES (key, '-infinity') ON CONFLICT DO NOTHING;
        SELECT p.tat INTO tat FROM webhookd.pacing p WHERE p.endpoint_key = key FOR UPDATE;
    END IF;
    -- Read once the row is ours: time spent queueing behind other processes' leases is not time gone by.
    at := clock_timestamp();
    start_in := extract(epoch FROM greatest(tat, at - make_interval(secs => burst)) - at)::double precision;
    granted := CASE WHEN start_in <= horizon THEN wanted ELSE 0 END;
    IF granted > 0 THEN
        UPDATE webhookd.pacing SET tat = at + make_interval(secs => start_in + granted / rate)
        WHERE endpoint_key = key;
    END IF;
END $$;

CREATE UNLOGGED TABLE IF NOT EXISTS webhookd.members (
    member_id text        PRIMARY KEY,  -- host/pid/random: one daemon process, one run of it
    seen_at   timestamptz NOT NULL      -- its last heartbeat, on Postgres's clock
) WITH (fillfactor = 50);
