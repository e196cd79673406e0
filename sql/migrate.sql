-- The statements of `pgml-tuned migrate` (db.migrate), around the files sql/install.sql lists.

-- name: migrate_lock
-- Concurrent migrates serialize on this transaction-level lock (a session-level one could be taken on one server
-- connection and released on another behind a transaction pooler); install.sql takes the same.
-- The files of sql/functions call each other in any order (as pg_dump's output does): a SQL-language body is
-- checked when it first runs, not when it is created.
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgml-tuned migrate')),
       pg_catalog.set_config('check_function_bodies', 'off', true);

-- name: migrations_table
SELECT pg_catalog.to_regclass('pgml.schema_migrations') IS NOT NULL AS present;

-- name: migrations_done
SELECT version FROM pgml.schema_migrations;

-- name: migration_record
INSERT INTO pgml.schema_migrations (version) VALUES (%(version)s) ON CONFLICT DO NOTHING;

-- name: active_sealing_key
SELECT key_id FROM pgml.sealing_keys WHERE active;

-- name: loopback_check
-- After migrating: one statement through this session's loopback, as a synchronous call makes (NULL without
-- dblink: the calls' own error says how to install it). A server that lets the loopback in without a password,
-- or that it cannot reach, fails here with the error pgml.transform would raise, and its fix.
SELECT CASE WHEN pgml._dblink_schema() IS NOT NULL THEN pgml._loopback('to_jsonb(1)') END AS answer;

-- name: stale_loopback_logins
-- Loopback logins whose database is gone (migrate and gc): listed, and dropped when %(apply)s and the role may.
SELECT login, dropped, note FROM pgml._stale_loopback_logins(%(apply)s);
