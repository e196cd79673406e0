-- 0022_fleet: the fleet. Every daemon registers itself in pgml.workers (devices, slots, the models its serving
-- process keeps warm), renews its row from its heartbeat loop and marks it stopped on a clean exit;
-- pgml.worker_status computes live / late / gone / stopped from the heartbeat's age. Jobs may ask for devices
-- (hyperparams.resources: {"gpus": N, "procs": N, "nodes": N}); a worker claims only what it can run, pgml.tune
-- says at submit time when no live worker could, and CALL pgml.wait says why a job does not move
-- (pgml._wait_advice). Writes go through the SECURITY DEFINER functions below, granted to pgml_worker; each
-- daemon's row is fenced on a random token only that daemon holds (its sha256 is stored).

CREATE TABLE IF NOT EXISTS pgml.workers (
    id                text PRIMARY KEY,
    login             name NOT NULL,                -- the database login that registered it
    token_hash        bytea NOT NULL,               -- sha256 of the daemon's registry token
    host              text NOT NULL,
    pid               integer,
    version           text NOT NULL,
    devices           jsonb NOT NULL DEFAULT '[]',  -- [{"index": "0", "name": "NVIDIA H100", "memory_mb": 81559}]
    gpus              integer NOT NULL DEFAULT 0,
    concurrency       integer NOT NULL,
    free_slots        integer NOT NULL,
    free_gpus         integer NOT NULL DEFAULT 0,
    running           bigint[] NOT NULL DEFAULT '{}',
    models_cached     jsonb NOT NULL DEFAULT '[]',  -- what its serving process keeps warm
    heartbeat_seconds real NOT NULL,
    lease_seconds     real NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    heartbeat_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    stopped_at        timestamptz
);
REVOKE ALL ON pgml.workers FROM PUBLIC;

-- live: heartbeat within two intervals; late: missed some, lease not yet over; gone: silent for longer than its
-- lease (killed, crashed, cut off); stopped: exited cleanly. (Runs as its owner, so the filter is explicit.)
CREATE OR REPLACE VIEW pgml.worker_status AS
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
       w.stopped_at
FROM pgml.workers w;

-- ---- a job's resources: the one parser (pgml.tune's check, the claim, the advice) ---------------------------
CREATE OR REPLACE FUNCTION pgml._job_resources(hyperparams jsonb, OUT gpus integer, OUT procs integer,
                                               OUT nodes integer)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb := hyperparams -> 'resources';
    k text;
    v jsonb;
BEGIN
    gpus := 0;
    procs := 1;
    nodes := 1;
    IF r IS NULL OR jsonb_typeof(r) = 'null' THEN
        RETURN;
    END IF;
    IF jsonb_typeof(r) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('hyperparams.resources must be a JSON object, got a JSON %s', jsonb_typeof(r)),
            HINT = 'e.g. "resources": {"gpus": 2}';
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM jsonb_each(r) e LOOP
        IF k NOT IN ('gpus', 'procs', 'nodes') THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('unknown hyperparams.resources key %L', k),
                HINT = 'resources takes "gpus" (devices per node), "procs" (processes per node), "nodes"';
        END IF;
        IF jsonb_typeof(v) <> 'number' OR v::text !~ '^[0-9]+$' OR v::text::numeric > 1024
           OR (k <> 'gpus' AND v::text::numeric < 1) THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('hyperparams.resources.%s must be a whole number %s, got %s', k,
                                 CASE WHEN k = 'gpus' THEN 'from 0 to 1024' ELSE 'from 1 to 1024' END, v),
                HINT = format('e.g. "resources": {"%s": %s}', k, CASE WHEN k = 'gpus' THEN 1 ELSE 2 END);
        END IF;
    END LOOP;
    gpus := coalesce((r ->> 'gpus')::integer, 0);
    procs := coalesce((r ->> 'procs')::integer, 1);
    nodes := coalesce((r ->> 'nodes')::integer, 1);
END $$;

-- Jobs of every training task may ask for resources (pgml_tuned/tasks.py agrees).
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources']
WHERE name IN ('text-classification', 'text-pair-classification', 'conversation', 'noop', 'predict_batch')
  AND NOT 'resources' = ANY (hyperparams);

-- ---- why a job does not move: the fleet's view of it (NULL: nothing to say) ---------------------------------
-- What no live worker can run: `gpus` devices on one worker. NULL when some live (or late) worker has them.
CREATE OR REPLACE FUNCTION pgml._fleet_shortfall(gpus integer) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_live bigint;
    v_most integer;
BEGIN
    SELECT count(*), max(w.gpus) INTO v_live, v_most
    FROM pgml.worker_status w WHERE w.state IN ('live', 'late');
    IF v_live = 0 THEN
        RETURN 'no live pgml-tuned worker is registered (pgml.worker_status)';
    END IF;
    IF _fleet_shortfall.gpus > coalesce(v_most, 0) THEN
        RETURN format('it asks for %s GPU%s and no live worker has that many (%s live, the most GPUs on one: %s)',
                      _fleet_shortfall.gpus, CASE WHEN _fleet_shortfall.gpus = 1 THEN '' ELSE 's' END, v_live,
                      coalesce(v_most, 0));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgml._wait_advice(job_id bigint) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_gpus integer;
    v_why text;
    v_holder record;
BEGIN
    SELECT * INTO v FROM pgml.jobs j WHERE j.id = _wait_advice.job_id;
    IF NOT FOUND OR NOT (v.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')) THEN
        RETURN NULL;
    END IF;
    IF v.status = 'queued' THEN
        v_gpus := coalesce((v.hyperparams -> 'resources' ->> 'gpus')::integer, 0);
        v_why := pgml._fleet_shortfall(v_gpus);
        -- with no worker at all, say so once the job has waited a little (a daemon may be starting)
        IF v_why IS NOT NULL AND (v_gpus > 0 OR pg_catalog.clock_timestamp() - v.updated_at > interval '5 seconds')
        THEN
            RETURN format('job %s is queued, but %s: it stays queued until one starts (pgml-tuned serve%s)',
                          v.id, v_why, CASE WHEN v_gpus > 0 THEN format(' --gpus on a host with %s', v_gpus) END);
        END IF;
    ELSIF v.status = 'running' AND v.lease_expires_at < pg_catalog.clock_timestamp() THEN
        IF NOT EXISTS (SELECT 1 FROM pgml.worker_status w WHERE w.state IN ('live', 'late')) THEN
            SELECT w.state, w.heartbeat_at INTO v_holder FROM pgml.worker_status w WHERE w.id = v.worker;
            RETURN format('job %s: its worker %s stopped heartbeating (last heartbeat %s, lease expired %s) and no '
                          'live worker is left to take it over: it resumes (attempt %s of %s) when a worker starts '
                          '(pgml-tuned serve)', v.id, v.worker, coalesce(v_holder.heartbeat_at, v.heartbeat_at),
                          v.lease_expires_at, v.attempt + 1, v.max_attempts);
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- ---- pgml.tune: resources checked (nothing queued on a bad value), a NOTICE when no live worker could run it -
CREATE OR REPLACE FUNCTION pgml._jobs_resources_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_why text;
BEGIN
    SELECT * INTO r FROM pgml._job_resources(NEW.hyperparams);  -- raises on a bad value
    IF TG_WHEN = 'AFTER' AND r.gpus > 0 THEN
        v_why := pgml._fleet_shortfall(r.gpus);
        IF v_why IS NOT NULL THEN
            RAISE NOTICE USING MESSAGE = format('job %s is queued, but %s', NEW.id, v_why),
                HINT = format('it waits until a worker with %s GPU%s starts (pgml-tuned serve --gpus ...); '
                              'SELECT * FROM pgml.worker_status shows the fleet', r.gpus,
                              CASE WHEN r.gpus = 1 THEN '' ELSE 's' END);
        END IF;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS jobs_resources_check ON pgml.jobs;
CREATE TRIGGER jobs_resources_check BEFORE INSERT ON pgml.jobs
    FOR EACH ROW WHEN (NEW.hyperparams ? 'resources') EXECUTE FUNCTION pgml._jobs_resources_check();
DROP TRIGGER IF EXISTS jobs_resources_notice ON pgml.jobs;
CREATE TRIGGER jobs_resources_notice AFTER INSERT ON pgml.jobs
    FOR EACH ROW WHEN (NEW.hyperparams ? 'resources') EXECUTE FUNCTION pgml._jobs_resources_check();

-- ---- the workers' writes --------------------------------------------------------------------------------------
-- Register (or re-register, after a restart) a daemon. Another login's live row with the same id is refused: two
-- daemons must not share a worker id. The same login may take its row over (a restart under the same id); the
-- old process's token then matches nothing, and it says so in its log.
CREATE OR REPLACE FUNCTION pgml._worker_register(worker_id text, token text, host text, pid integer, version text,
                                                 devices jsonb, gpus integer, concurrency integer,
                                                 heartbeat_seconds real, lease_seconds real) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.workers;
BEGIN
    IF worker_id IS NULL OR length(worker_id) NOT BETWEEN 1 AND 200 OR coalesce(length(token), 0) < 16
       OR jsonb_typeof(devices) <> 'array' OR gpus < 0 OR concurrency < 1 OR heartbeat_seconds <= 0
       OR lease_seconds <= 0 THEN
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
                                   free_slots, free_gpus, heartbeat_seconds, lease_seconds)
    VALUES (worker_id, session_user, pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8')), host, pid, version,
            devices, gpus, concurrency, concurrency, gpus, heartbeat_seconds, lease_seconds)
    ON CONFLICT (id) DO UPDATE
    SET login = EXCLUDED.login, token_hash = EXCLUDED.token_hash, host = EXCLUDED.host, pid = EXCLUDED.pid,
        version = EXCLUDED.version, devices = EXCLUDED.devices, gpus = EXCLUDED.gpus,
        concurrency = EXCLUDED.concurrency, free_slots = EXCLUDED.free_slots, free_gpus = EXCLUDED.free_gpus,
        running = '{}', models_cached = '[]', heartbeat_seconds = EXCLUDED.heartbeat_seconds,
        lease_seconds = EXCLUDED.lease_seconds, started_at = pg_catalog.clock_timestamp(),
        heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL;
    -- nobody needs rows of workers silent for a week
    DELETE FROM pgml.workers w WHERE w.heartbeat_at < pg_catalog.clock_timestamp() - interval '7 days';
END $$;

-- Its heartbeat: what it holds now. False when the row is no longer this daemon's (re-registered by another).
CREATE OR REPLACE FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer,
                                                  running bigint[], models_cached jsonb) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgml.workers w
    SET heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL,
        free_slots = greatest(0, _worker_heartbeat.free_slots), free_gpus = greatest(0, _worker_heartbeat.free_gpus),
        running = coalesce(_worker_heartbeat.running, '{}'),
        models_cached = CASE WHEN jsonb_typeof(_worker_heartbeat.models_cached) = 'array'
                             THEN _worker_heartbeat.models_cached ELSE '[]' END
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $$;

-- A clean exit: the row stays (state "stopped") until it is a week old.
CREATE OR REPLACE FUNCTION pgml._worker_stop(worker_id text, token text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgml.workers w
    SET stopped_at = pg_catalog.clock_timestamp(), free_slots = 0, free_gpus = 0, running = '{}',
        models_cached = '[]'
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $$;

-- ---- the queue summary, with the fleet (the same fleet columns on every status row) --------------------------
CREATE OR REPLACE VIEW pgml.queue_summary AS
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

-- ---- CALL pgml.wait: 0008's, plus the fleet's advice (an INFO line when it changes) ----------------------------
CREATE OR REPLACE PROCEDURE pgml.wait(job_id bigint, poll_seconds real DEFAULT 0.5, timeout_seconds real DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint := 0;
    v_log record;
    v_job record;
    v_start timestamptz := pg_catalog.clock_timestamp();
    v_advice text;
    v_said text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = wait.job_id) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('no job %s', wait.job_id), ERRCODE = 'no_data_found',
            HINT = 'pgml.tune() returns the job id; SELECT id, status FROM pgml.jobs lists your jobs';
    END IF;
    LOOP
        SELECT j.status, j.error, j.metrics, j.attempt INTO v_job FROM pgml.jobs j WHERE j.id = wait.job_id;
        FOR v_log IN SELECT l.id, l.logs FROM pgml.logs l WHERE l.job_id = wait.job_id AND l.id > v_last
                     ORDER BY l.id LOOP
            RAISE INFO '%', pg_catalog.jsonb_pretty(v_log.logs);
            v_last := v_log.id;
        END LOOP;
        EXIT WHEN v_job.status IN ('succeeded', 'failed', 'cancelled');
        v_advice := pgml._wait_advice(wait.job_id);
        IF v_advice IS NOT NULL AND v_advice IS DISTINCT FROM v_said THEN
            RAISE INFO '%', v_advice;
        END IF;
        v_said := v_advice;
        IF timeout_seconds IS NOT NULL
           AND pg_catalog.clock_timestamp() - v_start > pg_catalog.make_interval(secs => timeout_seconds) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s is still %s after %s s', wait.job_id,
                                                              v_job.status, timeout_seconds),
                ERRCODE = 'query_canceled', HINT = 'CALL pgml.wait again to keep following it';
        END IF;
        COMMIT;
        PERFORM pg_catalog.pg_sleep(poll_seconds);
    END LOOP;
    IF v_job.status = 'failed' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s failed: %s', wait.job_id, v_job.error),
            HINT = pg_catalog.format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', wait.job_id);
    END IF;
    RAISE INFO '%', pg_catalog.jsonb_pretty(pg_catalog.jsonb_build_object('job_id', wait.job_id, 'status',
        v_job.status, 'metrics', v_job.metrics, 'error', v_job.error));
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON pgml.workers, pgml.worker_status FROM PUBLIC;
REVOKE ALL ON FUNCTION pgml._job_resources(jsonb), pgml._fleet_shortfall(integer), pgml._wait_advice(bigint),
    pgml._jobs_resources_check(), pgml._worker_register(text, text, text, integer, text, jsonb, integer, integer,
                                                        real, real),
    pgml._worker_heartbeat(text, text, integer, integer, bigint[], jsonb), pgml._worker_stop(text, text) FROM PUBLIC;
GRANT SELECT ON pgml.worker_status TO pgml_user, pgml_worker, pgml_admin;
GRANT SELECT ON pgml.queue_summary TO pgml_user, pgml_worker;
GRANT EXECUTE ON FUNCTION pgml._wait_advice(bigint), pgml._job_resources(jsonb) TO pgml_user, pgml_worker;
GRANT EXECUTE ON FUNCTION pgml._worker_register(text, text, text, integer, text, jsonb, integer, integer, real, real),
    pgml._worker_heartbeat(text, text, integer, integer, bigint[], jsonb), pgml._worker_stop(text, text)
    TO pgml_worker;
GRANT EXECUTE ON PROCEDURE pgml.wait(bigint, real, real) TO pgml_user;

INSERT INTO pgml.schema_migrations (version) VALUES ('0022_fleet') ON CONFLICT DO NOTHING;
