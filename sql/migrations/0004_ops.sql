-- 0004_ops: following and steering jobs from SQL: pgml.cancel(), CALL pgml.wait(), pgml.job_status,
-- pgml.queue_summary. Plain SQL, idempotent, runnable with psql.

-- Cancel a job. A queued job is cancelled at once and never starts; for a running one the request is
-- recorded and its worker is told (NOTIFY pgml_control 'cancel:<id>'); it stops the training process
-- and marks the job cancelled within seconds (a dead worker's job is cancelled when its lease expires).
-- Returns the job's status after the call: cancelled, cancelling, or the final status it already had.
CREATE OR REPLACE FUNCTION pgml.cancel(job_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE pgml.jobs j
    SET cancel_requested = true,
        status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
        error = CASE WHEN j.status = 'queued' THEN 'cancelled by ' || session_user ELSE j.error END,
        finished_at = CASE WHEN j.status = 'queued' THEN clock_timestamp() ELSE j.finished_at END,
        updated_at = clock_timestamp()
    WHERE j.id = cancel.job_id AND j.status IN ('queued', 'running')
    RETURNING j.status INTO v_status;
    IF v_status = 'running' THEN
        PERFORM pg_notify('pgml_control', 'cancel:' || cancel.job_id);
        RETURN 'cancelling';
    ELSIF v_status IS NOT NULL THEN
        RETURN v_status;
    END IF;
    SELECT j.status INTO v_status FROM pgml.jobs j WHERE j.id = cancel.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', cancel.job_id), ERRCODE = 'no_data_found',
            HINT = 'SELECT id, status FROM pgml.jobs ORDER BY id DESC lists the jobs';
    END IF;
    RETURN v_status;  -- already succeeded, failed or cancelled
END $$;

-- Live view of every job, for people and dashboards.
CREATE OR REPLACE VIEW pgml.job_status AS
SELECT j.id,
       p.name AS project,
       j.task,
       j.status,
       j.attempt,
       j.max_attempts,
       j.worker,
       CASE WHEN j.status = 'running' THEN
           round(extract(epoch FROM clock_timestamp() - j.heartbeat_at)::numeric, 1) END AS heartbeat_age,
       (j.progress ->> 'step')::bigint AS step,
       (j.progress ->> 'max_steps')::bigint AS max_steps,
       round(100.0 * (j.progress ->> 'step')::numeric / nullif((j.progress ->> 'max_steps')::numeric, 0), 1)
           AS progress_pct,
       (j.progress ->> 'loss')::float8 AS last_loss,
       CASE WHEN j.status = 'running' AND (j.progress ->> 'steps_per_second')::float8 > 0 THEN
           make_interval(secs => greatest(0, ((j.progress ->> 'max_steps')::float8 - (j.progress ->> 'step')::float8)
                                        / (j.progress ->> 'steps_per_second')::float8)) END AS eta,
       j.cancel_requested,
       j.error,
       j.metrics,
       j.model_id,
       j.created_at,
       j.started_at,
       j.finished_at
FROM pgml.jobs j
JOIN pgml.projects p ON p.id = j.project_id;

-- One row per status, for ops.
CREATE OR REPLACE VIEW pgml.queue_summary AS
SELECT s.status,
       count(j.id) AS jobs,
       count(DISTINCT j.worker) FILTER (WHERE j.status = 'running') AS workers,
       count(*) FILTER (WHERE j.status = 'running' AND j.lease_expires_at < clock_timestamp()) AS expired_leases,
       max(clock_timestamp() - j.created_at) FILTER (WHERE j.status = 'queued') AS oldest_queued_age
FROM (VALUES ('queued'), ('running'), ('succeeded'), ('failed'), ('cancelled')) AS s (status)
LEFT JOIN pgml.jobs j ON j.status = s.status
GROUP BY s.status
ORDER BY array_position(ARRAY['queued', 'running', 'succeeded', 'failed', 'cancelled'], s.status);

-- CALL pgml.wait(job_id): print every new log row as an INFO message as it arrives (like PostgresML's
-- output), then the final status and metrics; raises the job's error if it failed. It COMMITs between
-- polls, so it never holds a snapshot for hours: CALL it outside an explicit transaction block.
CREATE OR REPLACE PROCEDURE pgml.wait(job_id bigint, poll_seconds real DEFAULT 0.5, timeout_seconds real DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint := 0;
    v_log record;
    v_job record;
    v_start timestamptz := clock_timestamp();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = wait.job_id) THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', wait.job_id), ERRCODE = 'no_data_found',
            HINT = 'pgml.tune() returns the job id; SELECT id, status FROM pgml.jobs lists them';
    END IF;
    LOOP
        SELECT j.status, j.error, j.metrics, j.attempt INTO v_job FROM pgml.jobs j WHERE j.id = wait.job_id;
        FOR v_log IN SELECT l.id, l.logs FROM pgml.logs l WHERE l.job_id = wait.job_id AND l.id > v_last
                     ORDER BY l.id LOOP
            RAISE INFO '%', jsonb_pretty(v_log.logs);
            v_last := v_log.id;
        END LOOP;
        EXIT WHEN v_job.status IN ('succeeded', 'failed', 'cancelled');
        IF timeout_seconds IS NOT NULL AND clock_timestamp() - v_start > make_interval(secs => timeout_seconds) THEN
            RAISE EXCEPTION USING MESSAGE = format('job %s is still %s after %s s', wait.job_id, v_job.status,
                                                   timeout_seconds),
                ERRCODE = 'query_canceled', HINT = 'CALL pgml.wait again to keep following it';
        END IF;
        COMMIT;
        PERFORM pg_sleep(poll_seconds);
    END LOOP;
    IF v_job.status = 'failed' THEN
        RAISE EXCEPTION USING MESSAGE = format('job %s failed: %s', wait.job_id, v_job.error),
            HINT = format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', wait.job_id);
    END IF;
    RAISE INFO '%', jsonb_pretty(jsonb_build_object('job_id', wait.job_id, 'status', v_job.status,
                                                    'metrics', v_job.metrics, 'error', v_job.error));
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0004_ops') ON CONFLICT DO NOTHING;
