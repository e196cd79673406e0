-- 0015_sync_calls: the synchronous entry points of the inference lane and of load_dataset (PostgresML's
-- signatures), on the loopback of 0014 and the requests of 0013.
--
-- pgml.transform submits a request through the loopback (committed at once, whatever the caller's transaction
-- does), then waits for the answer: in READ COMMITTED every statement of this function sees the serving
-- process's commit, so it polls its own session (an index lookup every 1-20 ms); under REPEATABLE READ or
-- SERIALIZABLE it polls through the loopback. The answer is taken (and deleted) through the loopback. A caller
-- that gives up (statement_timeout, pg_cancel_backend) abandons its request before the error goes on; a
-- request nobody claims within its timeout is abandoned and the call says no worker is serving.

-- Requests are submitted, read and abandoned as the caller (pgml._submitter(): session_user, or through the
-- loopback the user whose session sent it). Users call them directly too (the Python client does).
CREATE OR REPLACE FUNCTION pgml.request(kind text, model text, args jsonb, inputs jsonb) RETURNS bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._request_submit(pgml._submitter(), kind, model, args, inputs)
$$;

-- The serving process (the worker's login) reads a stored model's files while it answers a request whose
-- submitter may read that model (0010 took pgml.files from pgml_worker: the children read through tickets).
CREATE OR REPLACE FUNCTION pgml._serving_model_files(model_id bigint)
RETURNS TABLE (path text, part integer, data bytea)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.path, f.part, f.data FROM pgml.file_parts f JOIN pgml.models m ON m.id = f.model_id
    WHERE f.model_id = _serving_model_files.model_id
      AND EXISTS (SELECT 1 FROM pgml.requests r
                  WHERE r.status IN ('queued', 'running') AND pgml._may_read_model(m.owner, r.submitted_by))
    ORDER BY f.path, f.part
$$;

-- Wait for request `id` and return its answer (raising its error). Runs as the owner: it reads pgml.requests.
CREATE OR REPLACE FUNCTION pgml._await_request(p_id bigint, p_timeout double precision) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_start   timestamptz := pg_catalog.clock_timestamp();
    v_local   boolean := pg_catalog.current_setting('transaction_isolation') = 'read committed';
    v_status  text;
    v_worker  text;
    v_answer  jsonb;
    v_elapsed double precision;
BEGIN
    BEGIN
        LOOP
            IF v_local THEN
                SELECT r.status, r.claimed_by INTO v_status, v_worker FROM pgml.requests r WHERE r.id = p_id;
            ELSE  -- a snapshot that cannot see the answer: ask through the loopback (a finished one is taken)
                v_answer := pgml._loopback(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id));
                v_status := v_answer ->> 'status';
            END IF;
            EXIT WHEN v_status IS NULL OR v_status IN ('done', 'failed');
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
            IF v_elapsed > p_timeout THEN
                PERFORM pgml._loopback(format('to_jsonb(pgml._request_abandon(%s))', p_id));
                IF v_status = 'queued' THEN
                    RAISE EXCEPTION 'no pgml-tuned worker is serving: the request waited %s s and nobody took it',
                        round(v_elapsed::numeric, 1)
                        USING ERRCODE = 'lock_not_available',
                              HINT = 'start one (pgml-tuned serve) or check SELECT * FROM pgml.queue_summary; '
                                     'args => ''{"timeout": 120}'' waits longer';
                END IF;
                RAISE EXCEPTION 'the request timed out after %s s while % was answering it',
                    round(v_elapsed::numeric, 1), coalesce(v_worker, 'a worker')
                    USING ERRCODE = 'query_canceled',
                          HINT = 'args => ''{"timeout": 300}'' waits longer (long generations need it)';
            END IF;
            PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed IS NULL OR v_elapsed < 0.05 THEN 0.001
                                             WHEN v_elapsed < 1 THEN 0.005 ELSE 0.02 END);
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        -- statement_timeout or a cancel: leave nothing behind
        PERFORM pgml._loopback(format('to_jsonb(pgml._request_abandon(%s))', p_id));
        RAISE;
    END;
    IF v_local OR v_status IS NULL THEN
        v_answer := pgml._loopback(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id));
    END IF;
    IF v_answer IS NULL THEN
        RAISE EXCEPTION 'request % is gone (it expired, or its serving process failed it twice)', p_id
            USING ERRCODE = 'no_data_found', HINT = 'try again; pgml-tuned status shows the serving workers';
    END IF;
    IF v_answer ->> 'status' = 'failed' THEN
        RAISE EXCEPTION '%', v_answer ->> 'error' USING ERRCODE = 'data_exception';
    END IF;
    RETURN v_answer -> 'result';
END $$;

-- PostgresML's task names → the serving kinds.
CREATE OR REPLACE FUNCTION pgml._transform_kind(task text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE task
        WHEN 'text-classification' THEN 'classify'
        WHEN 'sentiment-analysis' THEN 'classify'
        WHEN 'text-generation' THEN 'generate'
        WHEN 'conversational' THEN 'chat'
        WHEN 'conversation' THEN 'chat'
        WHEN 'chat' THEN 'chat'
    END
$$;

CREATE OR REPLACE FUNCTION pgml._transform(task jsonb, args jsonb, inputs jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task    text;
    v_kind    text;
    v_model   text;
    v_args    jsonb := coalesce(args, '{}');
    v_id      bigint;
    v_timeout double precision;
    v_result  jsonb;
BEGIN
    IF task IS NULL OR pg_catalog.jsonb_typeof(task) <> 'object' THEN
        RAISE EXCEPTION 'task must be a JSON object such as {"task": "text-classification", "model": "..."}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_task := task ->> 'task';
    v_model := task ->> 'model';
    v_kind := pgml._transform_kind(v_task);
    IF v_kind IS NULL THEN
        RAISE EXCEPTION 'pgml.transform does not serve task %', coalesce(pg_catalog.quote_literal(v_task), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'serve "text-classification", "text-generation" or "conversational"';
    END IF;
    IF v_model IS NULL OR pg_catalog.btrim(v_model) = '' THEN
        RAISE EXCEPTION 'pgml.transform needs a model: {"task": "%", "model": "..."}', v_task
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a hub id, pgml:<project> (its deployed model), pgml:model:<id>, or one of your project names';
    END IF;
    IF pg_catalog.jsonb_typeof(v_args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object, not %', pg_catalog.jsonb_typeof(v_args)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the task object's other keys (e.g. "token", "load_in_8bit", "torch_dtype") are model options
    v_args := (task - 'task' - 'model') || v_args;
    v_timeout := coalesce((v_args ->> 'timeout')::double precision, 30);
    v_id := (pgml._loopback(format('to_jsonb(pgml.request(%L, %L, %L::jsonb, %L::jsonb))',
                                   v_kind, v_model, v_args, inputs)) #>> '{}')::bigint;
    v_result := pgml._await_request(v_id, v_timeout);
    RETURN v_result;
END $$;

CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb DEFAULT '{}', inputs text[] DEFAULT ARRAY[]::text[],
                                          cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._transform(task, args, pg_catalog.to_jsonb(inputs))
$$;

CREATE OR REPLACE FUNCTION pgml.transform(task text, args jsonb DEFAULT '{}', inputs text[] DEFAULT ARRAY[]::text[],
                                          cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._transform(pg_catalog.jsonb_build_object('task', task) || coalesce(args -> 'task_args', '{}'),
                           args - 'task_args', pg_catalog.to_jsonb(inputs))
$$;

-- Conversations: inputs are the messages, [{"role": "user", "content": "..."}, ...].
CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb, inputs jsonb[], cache_model boolean DEFAULT false)
RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._transform(task, args, pg_catalog.to_jsonb(inputs))
$$;

-- ---- the submitter, also through the loopback ------------------------------------------------------------------
-- pgml._submitted (0008; its rows' size from 0017's columns) and pgml.cancel (0008) as before, with the caller from
-- pgml._submitter(): a load_dataset
-- submitted through the loopback is its user's (limits, ownership), and so is a cancel of it.
CREATE OR REPLACE FUNCTION pgml._submitted(job_id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who   name := pgml._submitter();
    v_job   pgml.jobs;
    v_lim   pgml.role_limits;
    v_bytes bigint;
    v_rows  bigint;
    v_queued bigint;
BEGIN
    SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = v_who;
    IF NOT FOUND AND NOT pg_has_role(v_who, 'pgml_admin', 'MEMBER') THEN
        SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = 'pgml_user';
    END IF;
    -- the job's size is summed only when it could be over the limit: while all of pgml.job_rows is smaller than
    -- the limit, no job's rows in it can be larger (a scan of the rows just copied was a sixth of pgml.tune's time)
    IF v_lim.max_snapshot_bytes IS NOT NULL
       AND pg_catalog.pg_total_relation_size('pgml.job_rows'::regclass) > v_lim.max_snapshot_bytes THEN
        SELECT count(*), coalesce(sum(coalesce(pg_column_size(r.c1), 0) + coalesce(pg_column_size(r.c2), 0)
                                      + coalesce(pg_column_size(r.c3), 0) + coalesce(pg_column_size(r.c4), 0)
                                      + coalesce(pg_column_size(r.c5), 0) + coalesce(pg_column_size(r.c6), 0)
                                      + coalesce(pg_column_size(r.c7), 0) + coalesce(pg_column_size(r.c8), 0)), 0)
            INTO v_rows, v_bytes
        FROM pgml.job_rows r WHERE r.job_id = _submitted.job_id;
    ELSE
        SELECT count(*), 0 INTO v_rows, v_bytes FROM pgml.job_rows r WHERE r.job_id = _submitted.job_id;
    END IF;
    IF v_bytes > v_lim.max_snapshot_bytes THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('the job''s rows are %s MB; the limit for %s is %s MB', round(v_bytes / 1e6, 1),
                             v_lim.role, round(v_lim.max_snapshot_bytes / 1e6, 1)),
            HINT = 'train on fewer rows or shorter texts, or ask an administrator (pgml.role_limits)';
    END IF;
    SELECT count(*) INTO v_queued FROM pgml.jobs j WHERE j.submitted_by = v_who AND j.status = 'queued';
    IF v_queued >= v_lim.max_queued THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('%s has %s jobs in the queue; the limit for %s is %s', v_who, v_queued,
                             v_lim.role, v_lim.max_queued),
            HINT = 'wait for some to start, cancel some (pgml.cancel), or ask an administrator (pgml.role_limits)';
    END IF;
    UPDATE pgml.jobs j
    SET status = 'queued',
        snapshot_rows = CASE WHEN j.snapshot_columns IS NOT NULL THEN v_rows END,
        max_running = v_lim.max_running,
        max_runtime = v_lim.max_runtime,
        max_checkpoint_bytes = v_lim.max_checkpoint_bytes,
        updated_at = clock_timestamp()
    WHERE j.id = _submitted.job_id AND j.submitted_by = v_who AND j.status = 'submitting'
    RETURNING * INTO v_job;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('job %s is not being submitted by %s', _submitted.job_id, v_who),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    IF v_job.snapshot_rows < 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s has %s rows; at least 2 are needed (one to train, one to test)',
                             v_job.relation_name, v_job.snapshot_rows),
            HINT = 'check the relation (or view) returns the rows you expect';
    END IF;
    RETURN v_job.snapshot_rows;
END $$;

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
        PERFORM pg_notify('pgml_control', json_build_object('type', 'cancel_requested', 'id', cancel.job_id)::text);
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

-- ---- pgml.load_dataset: PostgresML's synchronous form ---------------------------------------------------------
-- Submits pgml.load_dataset_async() through the loopback (so a worker sees the job at once), waits for it and
-- returns (table_name, rows). A job nobody starts within pgml.sync_timeout seconds (default 30) is cancelled and
-- the call says no worker is serving; once a worker runs it, the call waits for the end (a cancel of the call
-- cancels the job). Progress arrives as NOTICEs, at most one every few seconds.
CREATE OR REPLACE FUNCTION pgml.load_dataset(source text, subset text DEFAULT NULL, "limit" integer DEFAULT NULL,
                                             kwargs jsonb DEFAULT '{}')
RETURNS TABLE (table_name text, rows bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job      bigint;
    v_status   text;
    v_progress jsonb;
    v_start    timestamptz := pg_catalog.clock_timestamp();
    v_said     timestamptz := pg_catalog.clock_timestamp();
    v_local    boolean := pg_catalog.current_setting('transaction_isolation') = 'read committed';
    v_timeout  double precision := coalesce(nullif(pg_catalog.current_setting('pgml.sync_timeout', true), '')::float8,
                                            30);
    v_elapsed  double precision;
BEGIN
    v_job := (pgml._loopback(format('to_jsonb(pgml.load_dataset_async(%L, %L, %s, %L::jsonb))', source, subset,
                                    coalesce("limit"::text, 'NULL'), coalesce(kwargs, '{}'))) #>> '{}')::bigint;
    BEGIN
        LOOP
            IF v_local THEN
                SELECT j.status, j.progress INTO v_status, v_progress FROM pgml.jobs j WHERE j.id = v_job;
            ELSE
                SELECT r ->> 'status', r -> 'progress' INTO v_status, v_progress
                FROM pgml._loopback(format('(SELECT to_jsonb(j) FROM (SELECT status, progress FROM pgml.jobs '
                                           'WHERE id = %s) j)', v_job)) r;
            END IF;
            EXIT WHEN v_status IN ('succeeded', 'failed', 'cancelled');
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
            IF v_status = 'queued' AND v_elapsed > v_timeout THEN
                PERFORM pgml._loopback(format('to_jsonb(pgml.cancel(%s))', v_job));
                RAISE EXCEPTION 'no pgml-tuned worker started load_dataset job % within % s', v_job, v_timeout
                    USING ERRCODE = 'lock_not_available',
                          HINT = 'start one (pgml-tuned serve), or SET pgml.sync_timeout = 600 to wait longer '
                                 'behind a busy queue; pgml.load_dataset_async() queues without waiting';
            END IF;
            IF pg_catalog.clock_timestamp() - v_said > interval '5 seconds' THEN
                RAISE NOTICE 'load_dataset job %: %', v_job,
                    CASE WHEN v_status = 'running' AND v_progress ? 'rows'
                         THEN (v_progress ->> 'rows') || ' rows so far' ELSE v_status END;
                v_said := pg_catalog.clock_timestamp();
            END IF;
            PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed < 1 THEN 0.01 WHEN v_elapsed < 10 THEN 0.05 ELSE 0.2 END);
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        PERFORM pgml._loopback(format('to_jsonb(pgml.cancel(%s))', v_job));
        RAISE;
    END;
    RETURN QUERY SELECT r.table_name, r.rows FROM pgml._dataset_result(v_job) r;
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml.request(text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_chunks(bigint, integer), pgml._request_abandon(bigint),
    pgml.transform(jsonb, jsonb, text[], boolean), pgml.transform(text, jsonb, text[], boolean),
    pgml.transform(jsonb, jsonb, jsonb[], boolean), pgml._transform(jsonb, jsonb, jsonb),
    pgml.load_dataset(text, text, integer, jsonb) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.request(text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_abandon(bigint), pgml.load_dataset_async(text, text, integer, jsonb), pgml.cancel(bigint)
    TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml._serving_model_files(bigint) TO pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0015_sync_calls') ON CONFLICT DO NOTHING;
