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

CREATE OR REPLACE FUNCTION pgml._request_answer(id bigint)
RETURNS TABLE (status text, result jsonb, error text, usage jsonb)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who   name := pgml._submitter();
    v_admin boolean := pg_catalog.pg_has_role(v_who, 'pgml_admin', 'MEMBER');
BEGIN
    RETURN QUERY
    DELETE FROM pgml.requests r
    WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id AND r.status IN ('done', 'failed')
      AND (v_admin OR r.submitted_by OPERATOR(pg_catalog.=) v_who)
    RETURNING r.status, r.result, r.error, r.usage;
    IF NOT FOUND THEN
        RETURN QUERY
        SELECT r.status, NULL::jsonb, NULL::text, NULL::jsonb FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id
          AND (v_admin OR r.submitted_by OPERATOR(pg_catalog.=) v_who);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgml._request_chunks(id bigint, after_seq integer DEFAULT -1)
RETURNS TABLE (seq integer, text text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.seq, c.text FROM pgml.request_chunks c JOIN pgml.requests r ON r.id OPERATOR(pg_catalog.=) c.request_id
    WHERE c.request_id OPERATOR(pg_catalog.=) _request_chunks.id AND c.seq OPERATOR(pg_catalog.>) after_seq
      AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
           OR pg_catalog.pg_has_role(pgml._submitter(), 'pgml_admin', 'MEMBER'))
    ORDER BY c.seq
$$;

CREATE OR REPLACE FUNCTION pgml._request_abandon(id bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM pgml.requests r WHERE r.id OPERATOR(pg_catalog.=) _request_abandon.id
          AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
               OR pg_catalog.pg_has_role(pgml._submitter(), 'pgml_admin', 'MEMBER'))
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
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
            ELSE
                v_status := pgml._loopback(format('(SELECT to_jsonb(a.status) FROM pgml._request_answer(%s) a)',
                                                  p_id)) ->> 0;
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
    v_answer := pgml._loopback(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id));
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

SELECT pgml._own_everything();
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml.request(text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_chunks(bigint, integer), pgml._request_abandon(bigint),
    pgml.transform(jsonb, jsonb, text[], boolean), pgml.transform(text, jsonb, text[], boolean),
    pgml.transform(jsonb, jsonb, jsonb[], boolean), pgml._transform(jsonb, jsonb, jsonb) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.request(text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_abandon(bigint) TO pgml_loopback;

INSERT INTO pgml.schema_migrations (version) VALUES ('0015_sync_calls') ON CONFLICT DO NOTHING;
