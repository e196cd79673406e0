-- 0029_async_bookkeeping: the queue's own bookkeeping commits without waiting for its WAL to be flushed
-- (synchronous_commit off, for that transaction only). What it writes is re-derived after a server crash, so losing
-- the last few hundred milliseconds of it is harmless: a lost heartbeat or lease renewal is renewed again (and after
-- a restart every worker gets a full lease of uptime before its job is reaped), a lost claim or child ticket puts
-- the job back in the queue (the worker's fenced writes then match nothing and it lets the job go), a lost reap is
-- reaped again. Everything a user or a job's result depends on — pgml.tune, a job's success, failure, cancellation
-- or requeue, its logs, files and checkpoints — still commits synchronously. On a fleet of 1000 workers the registry
-- heartbeat alone is 200 commits a second (bench/fleet.py). Plain SQL, idempotent, runnable with psql.

-- Makes the current transaction commit asynchronously; true. For the worker's own statements (sql/queries.sql).
CREATE OR REPLACE FUNCTION pgml._async_commit() RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL $$;

CREATE OR REPLACE FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer,
                                                  running bigint[], models_cached jsonb) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);  -- a lost beat is beaten again (above)
    UPDATE pgml.workers w
    SET heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL,
        free_slots = greatest(0, _worker_heartbeat.free_slots), free_gpus = greatest(0, _worker_heartbeat.free_gpus),
        running = coalesce(_worker_heartbeat.running, '{}'),
        models_cached = CASE WHEN jsonb_typeof(_worker_heartbeat.models_cached) = 'array'
                             THEN _worker_heartbeat.models_cached ELSE '[]' END
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._async_commit() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._async_commit() TO pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0029_async_bookkeeping') ON CONFLICT DO NOTHING;
