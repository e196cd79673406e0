-- 0026_wait_log_kinds: CALL pgml.wait prints the lines about a job (pgml.logs rows of kind info, warning, error:
-- 0018_log_kinds) as text, in order with its training rows, which it prints as before (pretty JSON):
--     INFO:  claimed by worker w1 (attempt 1)
--     INFO:  read 288 rows
--     INFO:  { "loss": 0.69, ... "step": 10 ... }
--     INFO:  requeued by worker w1: attempt 1 stopped before the end; ...
--     INFO:  warning: worker w1 stopped renewing its lease (...)
--     INFO:  taken over by worker w2 (attempt 2) after worker w1 stopped renewing its lease
--     INFO:  resuming from the checkpoint at step 26 (stored by attempt 1); ...
-- It is 0022_fleet's pgml.wait (with the fleet's advice) with that one change; it comes after 0022 because the last
-- definition wins. It runs as its caller (row-level security: one's own jobs) and COMMITs between polls; a procedure
-- that commits cannot pin its search_path, so every name in it is schema-qualified.

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
        FOR v_log IN SELECT l.id, l.kind, l.logs FROM pgml.logs l WHERE l.job_id = wait.job_id AND l.id > v_last
                     ORDER BY l.id LOOP
            IF v_log.kind = 'train' THEN
                RAISE INFO '%', pg_catalog.jsonb_pretty(v_log.logs);
            ELSE  -- a line about the job (0018_log_kinds): its text, "warning: " / "error: " before the others
                RAISE INFO '%', CASE WHEN v_log.kind = 'info' THEN '' ELSE v_log.kind || ': ' END
                    || coalesce(v_log.logs ->> 'message', v_log.logs::text);
            END IF;
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
GRANT EXECUTE ON PROCEDURE pgml.wait(bigint, real, real) TO pgml_user;

INSERT INTO pgml.schema_migrations (version) VALUES ('0026_wait_log_kinds') ON CONFLICT DO NOTHING;
