-- The fleet: workers register and heartbeat, worker_status and queue_summary, the shortfall of GPUs for gangs.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- live: heartbeat within two intervals; late: missed some, lease not yet over; gone: silent for longer than its
-- lease (killed, crashed, cut off); stopped: exited cleanly. It runs as its owner (pgml.workers holds token hashes
-- no other role reads), so what a user may not see is masked in its columns, and security_barrier keeps a caller's
-- functions above the view: they see only what it returns.
CREATE OR REPLACE VIEW pgml.worker_status WITH (security_barrier = true) AS
SELECT w.id,
       w.host,
       w.pid,
       w.version,
       CASE WHEN w.stopped_at IS NOT NULL THEN 'stopped'
            WHEN pg_catalog.clock_timestamp() - w.heartbeat_at > pg_catalog.make_interval(secs => w.lease_seconds)
                THEN 'gone'
            WHEN pg_catalog.clock_timestamp() - w.heartbeat_at
                 > pg_catalog.make_interval(secs => 2 * w.heartbeat_seconds) THEN 'late'
            ELSE 'live' END AS state,
       pg_catalog.round(EXTRACT(epoch FROM pg_catalog.clock_timestamp() - w.heartbeat_at)::numeric, 1)
           AS heartbeat_age,
       w.gpus,
       w.devices,
       w.concurrency,
       w.free_slots,
       w.free_gpus,
       -- a user sees which of their own jobs a worker runs, and not what others' models it keeps warm
       CASE WHEN pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                 OR pg_catalog.pg_has_role(session_user, 'pgml_worker', 'MEMBER') THEN w.running
            ELSE ARRAY(SELECT j.id FROM pgml.jobs j WHERE j.id = ANY (w.running) AND j.submitted_by = session_user
                       ORDER BY j.id) END AS running,
       CASE WHEN pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                 OR pg_catalog.pg_has_role(session_user, 'pgml_worker', 'MEMBER') THEN w.models_cached END
           AS models_cached,
       w.started_at,
       w.heartbeat_at,
       w.stopped_at,
       -- its serving process: bases and adapters loaded, adapter_mb, and since the daemon started loads,
       -- load_seconds, last_load_at, evictions, last_eviction_at by kind (base, adapter); not shown to users (as
       -- models_cached). Last: CREATE OR REPLACE VIEW adds columns only at the end.
       CASE WHEN pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                 OR pg_catalog.pg_has_role(session_user, 'pgml_worker', 'MEMBER') THEN w.serving END
           AS serving
FROM pgml.workers w;

-- ---- the workers' writes --------------------------------------------------------------------------------------
-- Register (or re-register, after a restart) a daemon. Another login's live row with the same id is refused: two
-- daemons must not share a worker id. The same login may take its row over (a restart under the same id); the
-- old process's token then matches nothing, and it says so in its log.
CREATE OR REPLACE FUNCTION pgml._worker_register(worker_id text, token text, host text, pid integer, version text,
                                                 devices jsonb, gpus integer, concurrency integer,
                                                 heartbeat_seconds real, lease_seconds real,
                                                 cpus integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.workers;
BEGIN
    IF worker_id IS NULL OR length(worker_id) NOT BETWEEN 1 AND 200 OR coalesce(length(token), 0) < 16
       OR jsonb_typeof(devices) <> 'array' OR gpus < 0 OR concurrency < 1 OR heartbeat_seconds <= 0
       OR lease_seconds <= 0 OR cpus < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('pgml._worker_register: invalid registration of worker %L', worker_id),
            HINT = 'a worker id of 1 to 200 characters, a token of 16 or more, devices a JSON array';
    END IF;
    SELECT * INTO v FROM pgml.workers w WHERE w.id = worker_id FOR UPDATE;
    IF FOUND AND v.login <> session_user AND v.stopped_at IS NULL
       AND pg_catalog.clock_timestamp() - v.heartbeat_at <= pg_catalog.make_interval(secs => v.lease_seconds) THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation',
            MESSAGE = format('worker id %L is in use by a live worker (login %s, host %s, pid %s)', worker_id,
                             v.login, v.host, v.pid),
            HINT = 'give each daemon its own --worker-id (PGML_WORKER_ID)';
    END IF;
    INSERT INTO pgml.workers AS w (id, login, token_hash, host, pid, version, devices, gpus, concurrency,
                                   free_slots, free_gpus, heartbeat_seconds, lease_seconds, cpus)
    VALUES (worker_id, session_user, pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8')), host, pid, version,
            devices, gpus, concurrency, concurrency, gpus, heartbeat_seconds, lease_seconds, cpus)
    ON CONFLICT (id) DO UPDATE
    SET login = EXCLUDED.login, token_hash = EXCLUDED.token_hash, host = EXCLUDED.host, pid = EXCLUDED.pid,
        version = EXCLUDED.version, devices = EXCLUDED.devices, gpus = EXCLUDED.gpus, cpus = EXCLUDED.cpus,
        concurrency = EXCLUDED.concurrency, free_slots = EXCLUDED.free_slots, free_gpus = EXCLUDED.free_gpus,
        running = '{}', models_cached = '[]', serving = '{}', heartbeat_seconds = EXCLUDED.heartbeat_seconds,
        lease_seconds = EXCLUDED.lease_seconds, started_at = pg_catalog.clock_timestamp(),
        heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL;
    -- nobody needs rows of workers silent for a week
    DELETE FROM pgml.workers w WHERE w.heartbeat_at < pg_catalog.clock_timestamp() - interval '7 days';
END $$;

-- A clean exit: the row stays (state "stopped") until it is a week old.
CREATE OR REPLACE FUNCTION pgml._worker_stop(worker_id text, token text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgml.workers w
    SET stopped_at = pg_catalog.clock_timestamp(), free_slots = 0, free_gpus = 0, running = '{}',
        models_cached = '[]', serving = '{}'
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $$;

-- ---- the queue summary, with the fleet (the same fleet columns on every status row) --------------------------
-- security_invoker: pgml.jobs with the caller's rights (its row-level security: one's own jobs, or all for an
-- administrator or a worker), the fleet through pgml.worker_status
CREATE OR REPLACE VIEW pgml.queue_summary WITH (security_invoker = true) AS
SELECT s.status,
       count(j.id) AS jobs,
       count(DISTINCT j.worker) FILTER (WHERE j.status = 'running') AS workers,
       count(*) FILTER (WHERE j.status = 'running' AND j.lease_expires_at < clock_timestamp()) AS expired_leases,
       max(clock_timestamp() - j.created_at) FILTER (WHERE j.status = 'queued') AS oldest_queued_age,
       f.live_workers,
       f.gone_workers,
       f.free_slots,
       f.free_gpus
FROM (VALUES ('queued'), ('running'), ('succeeded'), ('failed'), ('cancelled')) AS s (status)
CROSS JOIN (SELECT count(*) FILTER (WHERE w.state IN ('live', 'late')) AS live_workers,
                   count(*) FILTER (WHERE w.state = 'gone') AS gone_workers,
                   coalesce(sum(w.free_slots) FILTER (WHERE w.state IN ('live', 'late')), 0) AS free_slots,
                   coalesce(sum(w.free_gpus) FILTER (WHERE w.state IN ('live', 'late')), 0) AS free_gpus
            FROM pgml.worker_status w) AS f
LEFT JOIN pgml.jobs j ON j.status = s.status
    AND (j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER'))
GROUP BY s.status, f.live_workers, f.gone_workers, f.free_slots, f.free_gpus
ORDER BY array_position(ARRAY['queued', 'running', 'succeeded', 'failed', 'cancelled'], s.status);

-- ---- why a job does not move: also a gang bigger than the fleet ------------------------------------------------
-- What no live worker can run: `gpus` devices on one worker, on `nodes` workers at once. NULL when the fleet can.
CREATE OR REPLACE FUNCTION pgml._fleet_shortfall(gpus integer, nodes integer) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_live bigint;
    v_able bigint;
    v_most integer;
BEGIN
    SELECT count(*), max(w.gpus), count(*) FILTER (WHERE w.gpus >= _fleet_shortfall.gpus)
    INTO v_live, v_most, v_able
    FROM pgml.worker_status w WHERE w.state IN ('live', 'late');
    IF v_live = 0 THEN
        RETURN 'no live pgml-tuned worker is registered (pgml.worker_status)';
    END IF;
    IF _fleet_shortfall.gpus > coalesce(v_most, 0) THEN
        RETURN format('it asks for %s GPU%s and no live worker has that many (%s live, the most GPUs on one: %s)',
                      _fleet_shortfall.gpus, CASE WHEN _fleet_shortfall.gpus = 1 THEN '' ELSE 's' END, v_live,
                      coalesce(v_most, 0));
    END IF;
    IF coalesce(_fleet_shortfall.nodes, 1) > v_able THEN
        RETURN format('it asks for %s workers at once (resources.nodes) and %s live worker%s could run %s part',
                      _fleet_shortfall.nodes, v_able, CASE WHEN v_able = 1 THEN '' ELSE 's' END,
                      CASE WHEN v_able = 1 THEN 'its' ELSE 'a' END);
    END IF;
    RETURN NULL;
END $$;

-- (since 0029) the queue's own bookkeeping commits without waiting for its WAL to be flushed
-- (synchronous_commit off, for that transaction only). What it writes is re-derived after a server crash, so losing
-- the last few hundred milliseconds of it is harmless: a lost heartbeat or lease renewal is renewed again (and after
-- a restart every worker gets a full lease of uptime before its job is reaped), a lost claim or child ticket puts
-- the job back in the queue (the worker's fenced writes then match nothing and it lets the job go), a lost reap is
-- reaped again. Everything a user or a job's result depends on — pgml.tune, a job's success, failure, cancellation
-- or requeue, its logs, files and checkpoints — still commits synchronously. On a fleet of 1000 workers the registry
-- heartbeat alone is 200 commits a second (bench/fleet.py).

-- Makes the current transaction commit asynchronously; true. For the worker's own statements (sql/queries.sql).
CREATE OR REPLACE FUNCTION pgml._async_commit() RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL $$;

CREATE OR REPLACE FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer,
                                                  running bigint[], models_cached jsonb,
                                                  serving jsonb DEFAULT '{}') RETURNS boolean
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
                             THEN _worker_heartbeat.models_cached ELSE '[]' END,
        serving = CASE WHEN jsonb_typeof(_worker_heartbeat.serving) = 'object'
                       THEN _worker_heartbeat.serving ELSE '{}' END
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $$;
