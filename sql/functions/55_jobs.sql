
-- ---- triggers run as the owner: a worker's UPDATE records events and moves models without grants of its own
CREATE OR REPLACE FUNCTION pgml._job_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.status = 'submitting' THEN
        RETURN NULL;  -- pgml.tune() is still copying its rows: the job is born when it becomes queued
    END IF;
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.attempt IS DISTINCT FROM OLD.attempt THEN
        INSERT INTO pgml.job_events (job_id, attempt, worker, old_status, new_status, lease_expires_at)
        VALUES (NEW.id, NEW.attempt, NEW.worker,
                CASE WHEN TG_OP = 'UPDATE' AND OLD.status <> 'submitting' THEN OLD.status END,
                NEW.status, NEW.lease_expires_at);
        -- clients LISTEN pgml_job_status to follow jobs without polling: a wake-up naming nothing (anyone may
        -- LISTEN on any channel), after which a waiter reads its own jobs' rows (row-level security)
        PERFORM pg_catalog.pg_notify('pgml_job_status', '{"type": "job_status"}');
    END IF;
    -- workers LISTEN pgml_jobs: a job that becomes queued (submitted, requeued, reaped) wakes one at once. The
    -- nonce names nothing; it keeps the notices of one transaction apart (PostgreSQL folds identical ones into one),
    -- so k jobs queued at once still wake the herd control's claimers k times.
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_catalog.pg_notify('pgml_jobs', pg_catalog.json_build_object(
            'type', 'job_queued', 'nonce', pg_catalog.gen_random_uuid())::text);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status
       AND NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        -- the model row follows its job: one place keeps them consistent
        UPDATE pgml.models SET status = CASE NEW.status WHEN 'succeeded' THEN 'successful' ELSE NEW.status END,
                               updated_at = clock_timestamp()
        WHERE id = NEW.model_id;
        -- nothing of a finished job is kept that it no longer needs: its sealed secrets, and (unless
        -- materialize_snapshot) its rows and checkpoints
        UPDATE pgml.jobs SET secrets = NULL WHERE id = NEW.id AND secrets IS NOT NULL;
        IF NOT NEW.keep_snapshot THEN
            DELETE FROM pgml.job_rows WHERE job_id = NEW.id;
            DELETE FROM pgml.checkpoints WHERE job_id = NEW.id;
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- a deleted job's rows go with it (pgml.job_rows has no foreign key, see above)
CREATE OR REPLACE FUNCTION pgml._job_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgml.job_rows r USING gone g WHERE r.job_id = g.id;
    RETURN NULL;
END $$;

-- ---- views: what a role may see of the queue ------------------------------------------------------------
-- security_invoker (PostgreSQL 15+): the view reads pgml.jobs and pgml.projects with its caller's rights, so their
-- row-level security decides what it shows, and PostgreSQL applies those policies before any function of the
-- caller's in a WHERE clause sees a row. (Run as its owner, which bypasses row-level security, a cheap function
-- of the caller's ran before the view's own filter and saw every user's jobs.) The filter stays, as documentation.
CREATE OR REPLACE VIEW pgml.job_status WITH (security_invoker = true) AS
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
       j.finished_at,
       j.submitted_by
FROM pgml.jobs j
JOIN pgml.projects p ON p.id = j.project_id
WHERE j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
   OR pg_has_role(session_user, 'pgml_worker', 'MEMBER');

CREATE OR REPLACE FUNCTION pgml.cancel(job_id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who   name := pgml._submitter();
    v_status text;
BEGIN
    UPDATE pgml.jobs j
    SET cancel_requested = true,
        status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
        error = CASE WHEN j.status = 'queued' THEN 'cancelled by ' || v_who ELSE j.error END,
        finished_at = CASE WHEN j.status = 'queued' THEN clock_timestamp() ELSE j.finished_at END,
        updated_at = clock_timestamp()
    WHERE j.id = cancel.job_id AND j.status IN ('queued', 'running')
      AND (j.submitted_by = v_who OR pg_has_role(v_who, 'pgml_admin', 'MEMBER'))
    RETURNING j.status INTO v_status;
    IF v_status = 'running' THEN
        -- every worker running something renews its leases at once; the renewal reads cancel_requested from the
        -- row (the payload names no job: anyone may LISTEN on pgml_control)
        PERFORM pg_catalog.pg_notify('pgml_control', '{"type": "cancel_requested"}');
        RETURN 'cancelling';
    ELSIF v_status IS NOT NULL THEN
        RETURN v_status;
    END IF;
    SELECT j.status INTO v_status FROM pgml.jobs j WHERE j.id = cancel.job_id
        AND (j.submitted_by = v_who OR pg_has_role(v_who, 'pgml_admin', 'MEMBER'));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', cancel.job_id), ERRCODE = 'no_data_found',
            HINT = 'SELECT id, status FROM pgml.jobs ORDER BY id DESC lists your jobs';
    END IF;
    RETURN v_status;  -- already succeeded, failed or cancelled
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

-- (since 0020) new log rows wake whoever follows a job (the dashboard's live curves), as status changes
-- already do on pgml_job_status.
--
-- NOTIFY pgml_logs '{"type": "logs_written"}' once per statement that inserts log rows of a job (pgml._child_log
-- inserts one job's batch per statement, so this is one notice per batch, not per row). A wake-up only, like every
-- notice of the schema: a listener re-reads pgml.logs with its own rights (row-level security decides what it
-- sees). (Since issue 20 the payload names no job: any session may LISTEN on any channel.)

CREATE OR REPLACE FUNCTION pgml._logs_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows n WHERE n.job_id IS NOT NULL) THEN
        PERFORM pg_catalog.pg_notify('pgml_logs', '{"type": "logs_written"}');
    END IF;
    RETURN NULL;
END $$;

-- ---- one line per log row: how pgml.wait and pgml.tune(..., wait => true) print a job's progress ---------------
-- A number as a person reads it in a log line: whole numbers and short values as written (step 500, epoch 0.25),
-- others to 4 significant digits (grad_norm 5.23, eval_loss 0.3691, train_runtime 2360), tiny or huge ones and
-- every learning rate in e-notation (lr 1.9e-05). Anything not a number is its JSON text.
CREATE OR REPLACE FUNCTION pgml._log_value(key text, value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_text text := value #>> '{}';
    v numeric;
    v_abs numeric;
BEGIN
    IF value IS NULL OR pg_catalog.jsonb_typeof(value) <> 'number' THEN
        RETURN CASE WHEN pg_catalog.jsonb_typeof(value) = 'string' THEN v_text ELSE coalesce(value::text, 'null') END;
    END IF;
    v := v_text::numeric;
    v_abs := abs(v);
    IF v = 0 THEN
        RETURN '0';
    ELSIF v = trunc(v) AND v_text !~ '[.eE]' AND key <> 'learning_rate' THEN
        RETURN v_text;  -- a count: step 10000, train_runtime 2360
    ELSIF key = 'learning_rate' OR v_abs < 0.001 OR v_abs >= 1e9 THEN
        -- 4 significant digits in e-notation, trailing zeros of the mantissa dropped: 1.9e-05, 1.6e-05, 2e-05
        RETURN pg_catalog.regexp_replace(pg_catalog.btrim(pg_catalog.to_char(v, '9.999EEEE')), '\.?0+e', 'e');
    ELSIF pg_catalog.length(v_text) <= 6 THEN
        RETURN v_text;
    END IF;
    RETURN pg_catalog.trim_scale(round(v, greatest(0, 3 - floor(log(v_abs))::integer)))::text;
END $$;

-- The keys of a log row in reading order: those of `first` in that order, then the rest alphabetically, without
-- `skip`, each as "key value".
CREATE OR REPLACE FUNCTION pgml._log_pairs(logs jsonb, first text[], skip text[], sep text DEFAULT '  ')
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.string_agg(
               CASE e.key WHEN 'learning_rate' THEN 'lr' ELSE e.key END || ' ' || pgml._log_value(e.key, e.value),
               sep ORDER BY pg_catalog.array_position(first, e.key), e.key)
    FROM pg_catalog.jsonb_each(CASE WHEN pg_catalog.jsonb_typeof(logs) = 'object' THEN logs ELSE '{}' END) AS e
    WHERE e.key <> ALL (skip)
$$;

-- One pgml.logs row as one line, in PostgresML's INFO style (the guide's section 5.3, one line instead of a JSON
-- block): a training step, an evaluation, the training summary; a line about the job (kind info, warning, error:
-- 0018_log_kinds) is its text, "warning: " / "error: " before the others. Nothing a user reads is dropped but the
-- row's timestamp (the line arrives as it is written; pgml.logs keeps created_at):
--     step 500/10000  epoch 0.25  loss 0.3453  grad_norm 5.23  lr 1.9e-05
--     eval  step 10000/10000  epoch 5.0  eval_loss 0.3691  eval_accuracy 0.9344  eval_f1 0.9344  eval_runtime 41.62 ...
--     train  step 10000/10000  epoch 5.0  train_loss 0.1127  train_runtime 2360  train_samples_per_second 67.81 ...
CREATE OR REPLACE FUNCTION pgml._log_line(logs jsonb, kind text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN kind IS DISTINCT FROM 'train' THEN
            CASE WHEN kind = 'info' THEN '' ELSE coalesce(kind, 'info') || ': ' END
            || coalesce(logs ->> 'message', logs::text)
        WHEN pg_catalog.jsonb_typeof(logs) <> 'object' THEN logs::text
        ELSE pg_catalog.concat_ws('  ',
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.jsonb_object_keys(logs) k WHERE k LIKE 'eval\_%') THEN 'eval'
                 WHEN logs ? 'train_runtime' OR logs ? 'train_loss' THEN 'train' END,
            CASE WHEN logs ? 'step' THEN 'step ' || pgml._log_value('step', logs -> 'step')
                                         || coalesce('/' || pgml._log_value('max_steps', logs -> 'max_steps'), '') END,
            pgml._log_pairs(logs, ARRAY['epoch', 'loss', 'grad_norm', 'learning_rate', 'eval_loss', 'train_loss'],
                            ARRAY['step', 'max_steps', 'timestamp']))
    END
$$;

-- The line pgml.wait ends with: the job's end and its metrics, once, compact
--     job 3 succeeded: eval_loss 0.3691, eval_accuracy 0.934, eval_f1 0.93, ...
CREATE OR REPLACE FUNCTION pgml._job_end_line(job_id bigint, status text, metrics jsonb, error text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format('job %s %s', job_id, status)
           || coalesce(': ' || nullif(pgml._log_pairs(metrics, ARRAY['eval_loss', 'train_loss', 'epoch', 'step'],
                                                      ARRAY[]::text[], ', '), ''), '')
           || coalesce(' (' || error || ')', '')
$$;

-- CALL pgml.wait(job_id) follows a job: one line per pgml.logs row as it is written (pgml._log_line), the fleet's
-- advice when the job cannot start, and once the job has ended one line with its status and metrics
-- (pgml._job_end_line); a failed job raises its error. It runs as its caller (row-level security: one's own jobs)
-- and COMMITs between polls; a procedure that commits cannot pin its search_path, so every name in it is
-- schema-qualified.
--     INFO:  claimed by worker w1 (attempt 1)
--     INFO:  step 10/40  epoch 0.25  loss 0.69  grad_norm 3.2  lr 4.5e-05
--     INFO:  warning: worker w1 stopped renewing its lease (...)
--     INFO:  eval  step 40/40  epoch 1.0  eval_loss 0.41  eval_accuracy 0.875
--     INFO:  job 3 succeeded: eval_loss 0.41, eval_accuracy 0.875, ...

CREATE OR REPLACE PROCEDURE pgml.wait(job_id bigint, poll_seconds real DEFAULT 0.5, timeout_seconds real DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_follow jsonb := '{"last_log": 0}';
    v_start timestamptz := pg_catalog.clock_timestamp();
BEGIN
    LOOP
        v_follow := pgml._job_follow(wait.job_id, (v_follow ->> 'last_log')::bigint, v_follow ->> 'advice');
        EXIT WHEN v_follow ->> 'status' IN ('succeeded', 'failed', 'cancelled');
        IF timeout_seconds IS NOT NULL
           AND pg_catalog.clock_timestamp() - v_start > pg_catalog.make_interval(secs => timeout_seconds) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s is still %s after %s s', wait.job_id,
                                                              v_follow ->> 'status', timeout_seconds),
                ERRCODE = 'query_canceled', HINT = 'CALL pgml.wait again to keep following it';
        END IF;
        COMMIT;
        PERFORM pg_catalog.pg_sleep(poll_seconds);
    END LOOP;
    IF v_follow ->> 'status' = 'failed' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s failed: %s', wait.job_id, v_follow ->> 'error'),
            HINT = pg_catalog.format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', wait.job_id);
    END IF;
    RAISE INFO '%', pgml._job_end_line(wait.job_id, v_follow ->> 'status', v_follow -> 'metrics',
                                       v_follow ->> 'error');
END $$;

CREATE OR REPLACE FUNCTION pgml._wait_advice(job_id bigint) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_gpus integer;
    v_nodes integer;
    v_why text;
    v_holder record;
BEGIN
    SELECT * INTO v FROM pgml.jobs j WHERE j.id = _wait_advice.job_id;
    IF NOT FOUND OR NOT (v.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')) THEN
        RETURN NULL;
    END IF;
    v_gpus := coalesce((v.hyperparams -> 'resources' ->> 'gpus')::integer, 0);
    v_nodes := coalesce((v.hyperparams -> 'resources' ->> 'nodes')::integer, 1);
    IF v.status = 'queued' OR (v.status = 'running' AND v.gang_needed > 0) THEN
        v_why := pgml._fleet_shortfall(v_gpus, v_nodes);
        -- with no worker at all, say so once the job has waited a little (a daemon may be starting)
        IF v_why IS NOT NULL AND (v_gpus > 0 OR v_nodes > 1
                                  OR pg_catalog.clock_timestamp() - v.updated_at > interval '5 seconds') THEN
            RETURN format('job %s is %s, but %s: it waits until %s (pgml-tuned serve%s)',
                          v.id, CASE WHEN v.status = 'queued' THEN 'queued' ELSE 'forming its gang' END, v_why,
                          CASE WHEN v_nodes > 1 THEN format('%s workers are free at once', v_nodes)
                               ELSE 'one starts' END,
                          CASE WHEN v_gpus > 0 THEN format(' --gpus on a host with %s', v_gpus) END);
        END IF;
        IF v.status = 'running' THEN
            RETURN format('job %s is forming its gang: %s of %s workers joined; it starts when %s more join%s',
                          v.id, v_nodes - v.gang_needed, v_nodes, v.gang_needed,
                          CASE WHEN v.gang_needed = 1 THEN 's' ELSE '' END);
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
-- A job's life after submit: the status triggers (NOTIFY, job events, log rows), waiting (pgml.wait), cancelling, and the job_status view.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

CREATE OR REPLACE TRIGGER jobs_changed AFTER INSERT OR UPDATE OF status, attempt ON pgml.jobs
    FOR EACH ROW EXECUTE FUNCTION pgml._job_changed();

CREATE OR REPLACE TRIGGER jobs_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_deleted();

CREATE OR REPLACE TRIGGER jobs_logged AFTER UPDATE OF status, attempt ON pgml.jobs
    FOR EACH ROW EXECUTE FUNCTION pgml._job_logged();

CREATE OR REPLACE TRIGGER logs_written AFTER INSERT ON pgml.logs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._logs_written();
