-- 0018_log_kinds: everything a job's worker knows about the job reaches SQL, and each training step is reported
-- once however often the job was resumed. Plain SQL, idempotent, runnable with psql by an administrator.
--
-- pgml.logs.kind: 'train' (a Trainer log event, as before: the guide's loss query reads these), 'info', 'warning' or
-- 'error' (a line about the job: {"message": "<human text>", ...structured fields}). The child writes its lines
-- (rows read, split sizes, resuming from step N, checkpoints and files stored, stopped by SIGINT) through
-- pgml._child_log, fenced on its attempt's ticket as before; what happens to the job itself (claimed by worker X,
-- requeued, its lease expired, taken over by worker Y, failed with the reason, cancelled, succeeded) is written by a
-- trigger on pgml.jobs in the transaction that makes the change, whoever makes it (a worker, a reaper, pgml.cancel).
--
-- pgml.superseded_logs: when an attempt resumes from a checkpoint at step N (or starts over from step 0), the
-- training rows of earlier attempts past step N — and the summary row (train_runtime) an interrupted attempt
-- left — are moved there, in the same transaction that records the resume (pgml._child_resume). pgml.logs then
-- holds each step once, as the run that produced the final model saw it; what the interrupted attempts logged is
-- kept apart, readable by the same roles.

ALTER TABLE pgml.logs ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'train';
DO $$
BEGIN
    ALTER TABLE pgml.logs ADD CONSTRAINT logs_kind_check CHECK (kind IN ('train', 'info', 'warning', 'error'));
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;

CREATE TABLE IF NOT EXISTS pgml.superseded_logs (
    id                bigint PRIMARY KEY,  -- its id in pgml.logs
    model_id          bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    project_id        bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    job_id            bigint REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt           integer,
    seq               integer,
    created_at        timestamptz NOT NULL,
    kind              text NOT NULL,
    logs              jsonb NOT NULL,
    superseded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    superseded_by     integer NOT NULL,  -- the attempt that resumed
    resumed_from_step bigint NOT NULL    -- from the checkpoint of this step (0: started over)
);
CREATE INDEX IF NOT EXISTS superseded_logs_job_idx ON pgml.superseded_logs (job_id, id);
CREATE INDEX IF NOT EXISTS superseded_logs_model_idx ON pgml.superseded_logs (model_id, id);

ALTER TABLE pgml.superseded_logs ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS worker_all ON pgml.superseded_logs;
CREATE POLICY worker_all ON pgml.superseded_logs TO pgml_worker USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS user_read ON pgml.superseded_logs;
CREATE POLICY user_read ON pgml.superseded_logs FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = superseded_logs.model_id));

-- ---- the child's log rows, now with a kind ------------------------------------------------------------------
-- `logs` is a JSON array of {"seq": n, "kind": "train"|"info"|"warning", "entry": {...}} (kind defaults to train):
-- a batch retried after a lost reply inserts nothing twice. Returns how many rows were new.
CREATE OR REPLACE FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_log.job_id, _child_log.ticket, true);
    v_inserted bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(logs) IS DISTINCT FROM 'array'
       OR pg_catalog.jsonb_typeof(progress) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log takes a JSON object of progress and a JSON array of log entries';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(_child_log.logs) AS x
               WHERE coalesce(x.value ->> 'kind', 'train') NOT IN ('train', 'info', 'warning')) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log: a log entry''s kind is train, info or warning';
    END IF;
    UPDATE pgml.jobs j SET progress = j.progress || _child_log.progress, updated_at = pg_catalog.clock_timestamp()
    WHERE j.id = v.id;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    SELECT v.model_id, v.project_id, v.id, v.attempt, (x.value ->> 'seq')::integer,
           coalesce(x.value ->> 'kind', 'train'), x.value -> 'entry'
    FROM pg_catalog.jsonb_array_elements(_child_log.logs) WITH ORDINALITY AS x (value, n)
    ORDER BY x.n
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    RETURN v_inserted;
END $$;

-- ---- a resume: earlier attempts' rows past its step move apart, atomically with the row that says so ---------------
-- The attempt of this ticket starts training from step `step` (a checkpoint's; 0: from the start). Moves the
-- training rows of earlier attempts with a step past it, and their summary rows (train_runtime: an interrupted
-- attempt's, not the end), into pgml.superseded_logs, and stores `entry` (an info row, {"message": ...}) as this
-- attempt's log row `seq`. A call retried after a lost reply moves nothing more and stores nothing twice. Returns
-- how many rows it moved.
CREATE OR REPLACE FUNCTION pgml._child_resume(job_id bigint, ticket text, step bigint, seq integer, entry jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_resume.job_id, _child_resume.ticket, true);
    v_moved bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(_child_resume.entry) IS DISTINCT FROM 'object' OR _child_resume.step IS NULL
       OR _child_resume.step < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_resume takes a step >= 0 and a JSON object (the info row)';
    END IF;
    WITH moved AS (
        DELETE FROM pgml.logs l
        WHERE l.job_id = v.id AND l.attempt < v.attempt AND l.kind = 'train'
          AND (pg_catalog.jsonb_exists(l.logs, 'train_runtime')
               OR (pg_catalog.jsonb_typeof(l.logs -> 'step') = 'number'
                   AND (l.logs ->> 'step')::numeric > _child_resume.step))
        RETURNING l.*
    )
    INSERT INTO pgml.superseded_logs (id, model_id, project_id, job_id, attempt, seq, created_at, kind, logs,
                                      superseded_by, resumed_from_step)
    SELECT m.id, m.model_id, m.project_id, m.job_id, m.attempt, m.seq, m.created_at, m.kind, m.logs,
           v.attempt, _child_resume.step
    FROM moved m;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    VALUES (v.model_id, v.project_id, v.id, v.attempt, _child_resume.seq, 'info',
            _child_resume.entry || pg_catalog.jsonb_build_object(
                'superseded', v_moved,
                'message', coalesce(_child_resume.entry ->> 'message',
                                    pg_catalog.format('training from step %s', _child_resume.step))
                           || CASE WHEN v_moved > 0 THEN pg_catalog.format(
                                  '; the %s log rows of earlier attempts past step %s are now in pgml.superseded_logs',
                                  v_moved, _child_resume.step) ELSE '' END))
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    RETURN v_moved;
END $$;

-- ---- what happens to the job: one row per change, in the transaction that makes it ------------------------------
CREATE OR REPLACE FUNCTION pgml._job_logged() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind text := 'info';
    v_event text;
    v_message text;
    v_last jsonb := NEW.errors -> -1;  -- the latest attempt's error, if it failed
BEGIN
    IF OLD.status = 'submitting' OR (NEW.status IS NOT DISTINCT FROM OLD.status
                                     AND NEW.attempt IS NOT DISTINCT FROM OLD.attempt) THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 'running' AND NEW.attempt > OLD.attempt THEN
        IF OLD.attempt > 0 AND NEW.failed_attempts > 0 AND (v_last ->> 'attempt')::integer = OLD.attempt THEN
            v_event := 'taken_over';
            v_message := pg_catalog.format('taken over by worker %s (attempt %s) after worker %s stopped renewing '
                                           'its lease', NEW.worker, NEW.attempt, v_last ->> 'worker');
        ELSE
            v_event := 'claimed';
            v_message := pg_catalog.format('claimed by worker %s (attempt %s)', NEW.worker, NEW.attempt);
        END IF;
    ELSIF OLD.status = 'running' AND NEW.status = 'queued' AND NEW.failed_attempts > OLD.failed_attempts THEN
        v_kind := 'warning';
        v_event := 'lease_expired';
        v_message := pg_catalog.format('worker %s stopped renewing its lease (killed, crashed or cut off; last '
                                       'heartbeat %s): attempt %s is over, the job is back in the queue (%s of %s '
                                       'attempts failed)', OLD.worker, OLD.heartbeat_at, OLD.attempt,
                                       NEW.failed_attempts, NEW.max_attempts);
    ELSIF OLD.status = 'running' AND NEW.status = 'queued' THEN
        v_event := 'requeued';
        v_message := pg_catalog.format('requeued by worker %s: attempt %s stopped before the end; the next attempt '
                                       'resumes from the job''s latest checkpoint', OLD.worker, OLD.attempt);
    ELSIF NEW.status = 'failed' THEN
        v_kind := 'error';
        v_event := 'failed';
        v_message := pg_catalog.format('failed: %s', coalesce(NEW.error, v_last ->> 'error', 'no reason recorded'));
    ELSIF NEW.status = 'cancelled' THEN
        v_event := 'cancelled';
        v_message := CASE WHEN OLD.status = 'running'
                          THEN pg_catalog.format('cancelled while worker %s ran attempt %s', OLD.worker, OLD.attempt)
                          ELSE 'cancelled before it started' END
                     || coalesce(' (' || NEW.error || ')', '');
    ELSIF NEW.status = 'succeeded' THEN
        v_event := 'succeeded';
        v_message := pg_catalog.format('succeeded (attempt %s, worker %s)', NEW.attempt, OLD.worker);
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, kind, logs)
    VALUES (NEW.model_id, NEW.project_id, NEW.id, NEW.attempt, v_kind,
            pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                'message', v_message, 'event', v_event, 'status', NEW.status,
                'worker', coalesce(NEW.worker, OLD.worker), 'attempt', NEW.attempt)));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS jobs_logged ON pgml.jobs;
CREATE TRIGGER jobs_logged AFTER UPDATE OF status, attempt ON pgml.jobs
    FOR EACH ROW EXECUTE FUNCTION pgml._job_logged();

-- CALL pgml.wait prints these lines as text: see 0026_wait_log_kinds.sql (after 0022_fleet's pgml.wait, which it
-- extends).

-- ---- ownership and privileges ---------------------------------------------------------------------------
SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._child_resume(bigint, text, bigint, integer, jsonb), pgml._job_logged() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._child_resume(bigint, text, bigint, integer, jsonb) TO pgml_child;
GRANT SELECT ON pgml.superseded_logs TO pgml_user, pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0018_log_kinds') ON CONFLICT DO NOTHING;
