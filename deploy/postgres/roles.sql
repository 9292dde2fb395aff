-- Least-privilege Postgres roles for webhookd: one that migrates, one that runs.
--
--   migrate role (default webhookd_migrate): `webhookd migrate`, the init container. Owns the schema webhookd and
--     everything in it, so it can create and alter webhookd's tables, functions and triggers now and in later
--     releases; may add the subscriptions trigger to the subscriptions table (TRIGGER) and nothing else there.
--   runtime role (default webhookd): `webhookd run` and the operator commands. Reads and writes the rows of
--     webhookd's tables and reads the subscriptions table and Twenty's metadata; may create, alter or drop nothing.
--
-- Run once per database, as a superuser (or, on a managed service, its administrative user, which must be able to
-- grant on the subscriptions table), connected to the database webhookd uses (Twenty's):
--
--   psql "postgresql://postgres@db:5432/twenty" -f deploy/postgres/roles.sql \
--     -v migrate_password="$WEBHOOKD_MIGRATE_PASSWORD" -v runtime_password="$WEBHOOKD_RUNTIME_PASSWORD"
--
-- Variables (all optional): migrate_role, runtime_role, migrate_password, runtime_password (without one, a role
-- keeps the password it has, if any: set it later with psql's \password), subscriptions_table (default
-- core.webhook: postgres.subscriptions_table, schema-qualified).
--
-- Safe to run again, and meant to be after a change of the subscriptions table or to take over a database migrated
-- by a single role: the schema webhookd and everything in it then pass to the migrate role, and the runtime role
-- loses what only the migrate role may do. Roles are cluster-wide; the grants are per database, so run it in
-- every database webhookd uses.

\set ON_ERROR_STOP on
\if :{?migrate_role}
\else
  \set migrate_role webhookd_migrate
\endif
\if :{?runtime_role}
\else
  \set runtime_role webhookd
\endif
\if :{?subscriptions_table}
\else
  \set subscriptions_table core.webhook
\endif

BEGIN;

-- Login roles with no attribute beyond LOGIN: no superuser, no CREATEDB, no CREATEROLE, no REPLICATION.
SELECT format('CREATE ROLE %I LOGIN', role) FROM unnest(ARRAY[:'migrate_role', :'runtime_role']) AS role
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role)
\gexec
\if :{?migrate_password}
  ALTER ROLE :"migrate_role" PASSWORD :'migrate_password';
\endif
\if :{?runtime_password}
  ALTER ROLE :"runtime_role" PASSWORD :'runtime_password';
\endif

-- CONNECT is PUBLIC's by default, but hardened databases revoke it. Neither role gets CREATE on the database: the
-- schema webhookd is made here, so `webhookd migrate` finds it and never needs to create a schema itself.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), :'migrate_role', :'runtime_role')
\gexec
SELECT format('REVOKE CREATE ON DATABASE %I FROM %I', current_database(), :'runtime_role')
\gexec

-- The schema webhookd, owned by the migrate role: migrations create, alter and replace what is in it, which takes
-- ownership. Objects someone else made (a database migrated by one role before this file) pass to it too, so that
-- later migrations may alter them and the default privileges below cover every table.
CREATE SCHEMA IF NOT EXISTS webhookd AUTHORIZATION :"migrate_role";
ALTER SCHEMA webhookd OWNER TO :"migrate_role";
-- Sequences owned by a column and indexes follow their table.
SELECT format('ALTER TABLE %s OWNER TO %I', c.oid::regclass, :'migrate_role')
FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
WHERE c.relnamespace = 'webhookd'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND r.rolname <> :'migrate_role'
\gexec
SELECT format('ALTER SEQUENCE %s OWNER TO %I', c.oid::regclass, :'migrate_role')
FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
WHERE c.relnamespace = 'webhookd'::regnamespace AND c.relkind = 'S' AND r.rolname <> :'migrate_role'
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.classid = 'pg_class'::regclass
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
\gexec
-- The subscriptions trigger's function among them: it is SECURITY DEFINER, so it must run as the owner of
-- webhookd.previous_secrets, which it writes whichever role changes a webhook.
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, :'migrate_role')
FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
WHERE p.pronamespace = 'webhookd'::regnamespace AND r.rolname <> :'migrate_role'
\gexec
SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, :'migrate_role')
FROM pg_type t JOIN pg_roles r ON r.oid = t.typowner
WHERE t.typnamespace = 'webhookd'::regnamespace AND t.typtype IN ('c', 'd', 'e', 'r') AND t.typrelid = 0
  AND r.rolname <> :'migrate_role'
\gexec

-- The runtime role: rows, not structure. USAGE without CREATE on the schema; DML on every table (COPY of the
-- attempt log is an INSERT; no TRUNCATE, REFERENCES or TRIGGER); the sequences behind bigserial ids; the
-- functions it calls (webhookd.pace_lease). LISTEN, NOTIFY and advisory locks need no privilege.
REVOKE CREATE ON SCHEMA webhookd FROM :"runtime_role";
GRANT USAGE ON SCHEMA webhookd TO :"runtime_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA webhookd TO :"runtime_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA webhookd TO :"runtime_role";
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA webhookd TO :"runtime_role";
-- What later migrations create, as the migrate role, gets the same grants when it is created: an upgrade needs no
-- new run of this file. (Run `webhookd migrate` as the migrate role only: another creator's objects are not
-- covered.)
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrate_role" IN SCHEMA webhookd
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrate_role" IN SCHEMA webhookd
  GRANT USAGE, SELECT ON SEQUENCES TO :"runtime_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrate_role" IN SCHEMA webhookd
  GRANT EXECUTE ON FUNCTIONS TO :"runtime_role";

-- The subscriptions table.
SELECT CASE WHEN cardinality(parts) = 2 THEN parts[1] ELSE 'public' END AS subscriptions_schema,
       parts[cardinality(parts)] AS subscriptions_relname
FROM parse_ident(:'subscriptions_table') AS parts
\gset
SELECT to_regclass(format('%I.%I', :'subscriptions_schema', :'subscriptions_relname')) IS NOT NULL
  AS subscriptions_exist
\gset
\if :subscriptions_exist
  -- A table a single-role setup created (no Twenty here) passes to the migrate role, like the schema webhookd.
  SELECT format('ALTER TABLE %s OWNER TO %I', c.oid::regclass, :'migrate_role')
  FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
  WHERE c.oid = format('%I.%I', :'subscriptions_schema', :'subscriptions_relname')::regclass
    AND r.rolname = :'runtime_role'
  \gexec
  SELECT format('ALTER SCHEMA %I OWNER TO %I', n.nspname, :'migrate_role')
  FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
  WHERE n.nspname = :'subscriptions_schema' AND r.rolname = :'runtime_role'
  \gexec
  -- Twenty's table: the migrate role attaches the trigger that tells running daemons of a change (CREATE TRIGGER
  -- takes TRIGGER; the function is its own) and reads nothing; the runtime role reads it. Neither may change a
  -- row, and what a single-role setup granted beyond that goes.
  SELECT format('GRANT USAGE ON SCHEMA %I TO %I, %I', :'subscriptions_schema', :'migrate_role', :'runtime_role')
  \gexec
  SELECT format('REVOKE ALL ON TABLE %I.%I FROM %I', :'subscriptions_schema', :'subscriptions_relname', role)
  FROM unnest(ARRAY[:'migrate_role', :'runtime_role']) AS role
  WHERE NOT EXISTS (SELECT FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
                    WHERE c.oid = format('%I.%I', :'subscriptions_schema', :'subscriptions_relname')::regclass
                      AND r.rolname = role)
  \gexec
  SELECT format('GRANT TRIGGER ON TABLE %I.%I TO %I', :'subscriptions_schema', :'subscriptions_relname',
                :'migrate_role')
  \gexec
  SELECT format('GRANT SELECT ON TABLE %I.%I TO %I', :'subscriptions_schema', :'subscriptions_relname',
                :'runtime_role')
  \gexec
\else
  -- No Twenty here: `webhookd migrate` creates the table, in a schema made for the migrate role where it is
  -- missing (so it needs no CREATE on the database), and the runtime role may read what it creates there.
  SELECT format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', :'subscriptions_schema', :'migrate_role')
  \gexec
  SELECT format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', :'subscriptions_schema', :'migrate_role')
  \gexec
  SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'subscriptions_schema', :'runtime_role')
  \gexec
  SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT SELECT ON TABLES TO %I',
                :'migrate_role', :'subscriptions_schema', :'runtime_role')
  \gexec
\endif

-- Twenty's metadata, where it is here: the Debezium input and `delivery.body_format: twenty` read which workspace
-- a schema holds and what its tables and columns mean (the daemon refuses to start without it, naming the GRANT).
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'runtime_role')
FROM pg_namespace n
WHERE n.nspname IN ('core', 'metadata')
  AND EXISTS (SELECT FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
              AND c.relname IN ('workspace', 'objectMetadata', 'fieldMetadata', 'dataSource'))
\gexec
SELECT format('GRANT SELECT ON TABLE %I.%I TO %I', n.nspname, c.relname, :'runtime_role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('core', 'metadata') AND c.relkind IN ('r', 'p')
  AND c.relname IN ('workspace', 'objectMetadata', 'fieldMetadata', 'dataSource')
\gexec

COMMIT;
