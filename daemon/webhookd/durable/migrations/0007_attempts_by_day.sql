-- The attempt log moves to tables partitioned by day (migrations/attempt_log/, in the attempts database). The table
-- webhookd.attempts stays where it is, for as long as anything may still need it: daemons of earlier releases keep
-- writing to it during a rolling upgrade (and refuse to start without it, so it is never dropped: a rollback stays
-- possible), and `deliveries show`, `list` and `replay` read it beside the new tables. It is emptied at once, by the
-- daemons, once no earlier daemon is running and its newest row is older than the retention; until then earlier
-- daemons prune it as they always did.

-- Which attempt-log table a process writes; NULL is a daemon of an earlier release, which writes webhookd.attempts.
ALTER TABLE webhookd.members ADD COLUMN IF NOT EXISTS attempt_log text;

-- Empties webhookd.attempts when nothing needs its rows any more; returns whether it did. The table is locked
-- before the checks (NOWAIT: a writer holding it means it is still in use), so that no earlier daemon can write
-- between them and the TRUNCATE. SECURITY DEFINER: the daemon's role may truncate nothing (see
-- keep_attempt_partitions).
CREATE OR REPLACE FUNCTION webhookd.retire_attempts(retention double precision) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s' AS $$
BEGIN
    IF to_regclass('webhookd.attempts') IS NULL
       OR EXISTS (SELECT FROM webhookd.members WHERE attempt_log IS NULL)
       OR NOT EXISTS (SELECT FROM webhookd.attempts) THEN
        RETURN false;
    END IF;
    BEGIN
        LOCK TABLE webhookd.attempts IN ACCESS EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    IF EXISTS (SELECT FROM webhookd.members WHERE attempt_log IS NULL)
       OR EXISTS (SELECT FROM webhookd.attempts WHERE at >= now() - make_interval(secs => retention)) THEN
        RETURN false;
    END IF;
    TRUNCATE webhookd.attempts;
    RETURN true;
END $$;
