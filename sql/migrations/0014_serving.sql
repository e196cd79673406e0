-- 0014_serving: the inference lane's requests and answers. A request is a row a trusted submitter (the
-- pgml.transform loopback, the Python client's API) inserts through pgml._request_submit; a serving process
-- (the daemon's child `python -m pgml_tuned.serving`, as pgml_worker) claims batches of them, answers each
-- (result, or error; streamed generation writes chunks as it goes), and the submitter consumes the answer
-- with pgml._request_answer, which deletes it. Nothing piles up: consumed answers are deleted at once, answers
-- nobody consumed after a short TTL, requests nobody picked up at their deadline; a request whose serving
-- process died is retried once, then failed (its lease runs out within seconds, or the daemon that saw the
-- process die releases it at once).
--
-- Status: queued → running → done | failed   (running → queued once, when its serving process died)

CREATE TABLE IF NOT EXISTS pgml.requests (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    submitted_by     name NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('classify', 'generate', 'chat')),
    model            text NOT NULL,        -- as the worker resolves it: a hub id, a directory, pgml:<ref>
    args             jsonb NOT NULL DEFAULT '{}',
    inputs           jsonb NOT NULL,
    stream           boolean NOT NULL DEFAULT false,
    status           text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    claimed_by       text,                 -- the serving process (worker id/serving-N)
    lease_expires_at timestamptz,          -- running: renewed by its serving process while it works
    deadline         timestamptz NOT NULL, -- queued past it: nobody serves; deleted
    attempts         integer NOT NULL DEFAULT 0,
    result           jsonb,
    error            text,
    usage            jsonb,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    answered_at      timestamptz
);
CREATE INDEX IF NOT EXISTS requests_queued_idx ON pgml.requests (id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS requests_running_idx ON pgml.requests (claimed_by) WHERE status = 'running';

-- Streamed generation: text pieces in order, readable while the request runs; deleted with their request.
CREATE TABLE IF NOT EXISTS pgml.request_chunks (
    request_id bigint NOT NULL REFERENCES pgml.requests (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    text       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (request_id, seq)
);

-- What a project serves: pgml.deployments (0013_loopback), its latest row, else its latest successful model.

ALTER TABLE pgml.requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.request_chunks ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS worker_all ON pgml.deployments;
CREATE POLICY worker_all ON pgml.deployments FOR SELECT TO pgml_worker USING (true);
-- requests and chunks: no policy for anyone; only the functions below (running as the owner) touch them

-- The stored model `ref` names for `submitter`, among the models it may read (its own; any for a pgml_admin
-- member), as 0008's resolve_model_ref: `model:<id>` that model; `<project>` that project's deployed model
-- (its latest deployment, else its latest successful model). No row: no such model (or not the submitter's).
CREATE OR REPLACE FUNCTION pgml._serving_model(submitter name, ref text)
RETURNS TABLE (id bigint, status text, base_model text, task text, project_name text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH who AS (
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                       WHERE r.rolname = submitter AND pg_catalog.pg_has_role(r.oid, 'pgml_admin', 'MEMBER')) AS admin
    ), by_id AS (
        SELECT m.id, m.status, m.base_model, m.task, p.name AS project_name
        FROM pgml.models m JOIN pgml.projects p ON p.id OPERATOR(pg_catalog.=) m.project_id, who
        WHERE ref OPERATOR(pg_catalog.~) '^model:[0-9]+$'
          AND m.id OPERATOR(pg_catalog.=) pg_catalog.substr(ref, 7)::bigint
          AND (m.owner OPERATOR(pg_catalog.=) submitter OR who.admin)
    ), project AS (
        SELECT p.id, p.name FROM pgml.projects p, who
        WHERE ref OPERATOR(pg_catalog.!~) '^model:' AND p.name OPERATOR(pg_catalog.=) ref
          AND (p.owner OPERATOR(pg_catalog.=) submitter OR who.admin)
        ORDER BY (p.owner OPERATOR(pg_catalog.=) submitter) DESC, p.id
        LIMIT 1
    ), deployed AS (
        SELECT m.id, m.status, m.base_model, m.task, pr.name AS project_name
        FROM project pr
        JOIN LATERAL (
            SELECT x.id FROM (
                (SELECT d.model_id AS id, 0 AS rank, d.id AS seq FROM pgml.deployments d
                 WHERE d.project_id OPERATOR(pg_catalog.=) pr.id ORDER BY d.id DESC LIMIT 1)
                UNION ALL
                (SELECT m2.id, 1, m2.id FROM pgml.models m2
                 WHERE m2.project_id OPERATOR(pg_catalog.=) pr.id AND m2.status OPERATOR(pg_catalog.=) 'successful'
                 ORDER BY m2.id DESC LIMIT 1)
            ) x ORDER BY x.rank, x.seq DESC LIMIT 1
        ) pick ON true
        JOIN pgml.models m ON m.id OPERATOR(pg_catalog.=) pick.id
    )
    SELECT * FROM by_id UNION ALL SELECT * FROM deployed
$$;

-- Which kinds a stored model of a task may serve.
CREATE OR REPLACE FUNCTION pgml._serving_kinds(task text) RETURNS text[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE task
        WHEN 'text-classification' THEN ARRAY['classify']
        WHEN 'text-pair-classification' THEN ARRAY['classify']
        WHEN 'conversation' THEN ARRAY['generate', 'chat']
        WHEN 'text-generation' THEN ARRAY['generate', 'chat']
        ELSE ARRAY[]::text[] END
$$;

-- Queue a request for `submitter` (the caller vouches for it: EXECUTE is for trusted roles only). Everything
-- SQL can check is checked here, with an error naming the problem and a HINT with the fix; nothing is queued on
-- error. Returns the request id; NOTIFY pgml_requests carries only {"type": "request_queued"}.
--   kind     'classify' (inputs: text[] as a JSON array of strings), 'generate' (prompts, the same),
--            'chat' (inputs: one conversation, a JSON array of {"role", "content"} messages)
--   model    a hub id, a worker directory, pgml:<project> (its deployed model), pgml:model:<id>, or a bare
--            project name of the submitter (a name without '/' that is one of its projects; else a hub id)
--   args     passed to the pipeline / generate; ours: "stream" (chat/generate: write chunks as tokens come),
--            "timeout" (seconds a request may wait for a serving process, default 60)
CREATE OR REPLACE FUNCTION pgml._request_submit(submitter name, kind text, model text, args jsonb, inputs jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_args    jsonb := coalesce(_request_submit.args, '{}');  -- secrets ("token": ...) are dropped below
    v_model   text := pg_catalog.btrim(coalesce(_request_submit.model, ''));
    v_ref     text;
    v_row     record;
    v_msg     jsonb;
    v_i       integer := 0;
    v_timeout double precision;
    v_id      bigint;
    v_stream  boolean;
BEGIN
    IF submitter IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = submitter) THEN
        PERFORM pgml._fail(pg_catalog.format('unknown submitter %L', submitter), 'pass the login that asks');
    END IF;
    IF kind IS NULL OR kind OPERATOR(pg_catalog.<>) ALL (ARRAY['classify', 'generate', 'chat']) THEN
        PERFORM pgml._fail(pg_catalog.format('unknown request kind %L', kind),
                           'kinds are: ''classify'', ''generate'', ''chat''');
    END IF;
    IF v_model OPERATOR(pg_catalog.=) '' THEN
        PERFORM pgml._fail('a model is required',
            'name a Hugging Face model id, pgml:<project> (its deployed model) or pgml:model:<id>');
    END IF;
    IF pg_catalog.jsonb_typeof(v_args) OPERATOR(pg_catalog.<>) 'object' THEN
        PERFORM pgml._fail(pg_catalog.format('args must be a JSON object, got a JSON %s', pg_catalog.jsonb_typeof(v_args)),
                           'e.g. ''{"max_new_tokens": 32}''');
    END IF;
    IF pg_catalog.octet_length(v_args::text) OPERATOR(pg_catalog.>) 65536 THEN
        PERFORM pgml._fail('args are over 64 KiB', 'pass only the settings the pipeline needs');
    END IF;
    -- a hub token is never stored: gated models are served with the workers' own hub access
    v_args := v_args OPERATOR(pg_catalog.-) pgml._secret_keys();
    v_stream := coalesce(pg_catalog.jsonb_typeof(v_args -> 'stream') OPERATOR(pg_catalog.=) 'boolean'
                         AND (v_args ->> 'stream')::boolean, false);
    IF v_stream AND kind OPERATOR(pg_catalog.=) 'classify' THEN
        PERFORM pgml._fail('stream is for generation', 'leave "stream" out of a classification''s args');
    END IF;
    IF v_args ? 'timeout' THEN
        IF pg_catalog.jsonb_typeof(v_args -> 'timeout') OPERATOR(pg_catalog.<>) 'number'
           OR (v_args ->> 'timeout')::double precision NOT BETWEEN 0.1 AND 3600 THEN
            PERFORM pgml._fail(pg_catalog.format('args.timeout %s is not a number of seconds from 0.1 to 3600',
                                                 v_args -> 'timeout'), 'e.g. "timeout": 30');
        END IF;
    END IF;
    v_timeout := coalesce((v_args ->> 'timeout')::double precision, 60);

    -- inputs
    IF inputs IS NULL OR pg_catalog.jsonb_typeof(inputs) OPERATOR(pg_catalog.<>) 'array'
       OR pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.=) 0 THEN
        PERFORM pgml._fail('inputs are empty or NULL',
            CASE WHEN kind OPERATOR(pg_catalog.=) 'chat' THEN
                'pass the conversation: [{"role": "user", "content": "..."}]'
            ELSE 'pass at least one text, e.g. ARRAY[''I love this movie'']' END);
    END IF;
    IF pg_catalog.octet_length(inputs::text) OPERATOR(pg_catalog.>) 1048576 THEN
        PERFORM pgml._fail(pg_catalog.format('inputs are %s bytes, over the limit of 1 MiB',
                                             pg_catalog.octet_length(inputs::text)),
                           'split them into several calls (or a batch job over a table)');
    END IF;
    IF pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.>) 1000 THEN
        PERFORM pgml._fail(pg_catalog.format('%s inputs, over the limit of 1000 per call',
                                             pg_catalog.jsonb_array_length(inputs)),
                           'split them into several calls (or a batch job over a table)');
    END IF;
    IF kind OPERATOR(pg_catalog.=) 'chat' THEN
        FOR v_msg IN SELECT e FROM pg_catalog.jsonb_array_elements(inputs) e LOOP
            v_i := v_i OPERATOR(pg_catalog.+) 1;
            IF pg_catalog.jsonb_typeof(v_msg) OPERATOR(pg_catalog.<>) 'object'
               OR pg_catalog.jsonb_typeof(v_msg -> 'role') IS DISTINCT FROM 'string'
               OR pg_catalog.jsonb_typeof(v_msg -> 'content') IS DISTINCT FROM 'string' THEN
                PERFORM pgml._fail(pg_catalog.format('message %s is malformed: %s', v_i, pg_catalog.left(v_msg::text, 200)),
                                   'each message is {"role": "system"|"user"|"assistant", "content": "text"}');
            END IF;
            IF (v_msg ->> 'role') OPERATOR(pg_catalog.<>) ALL (ARRAY['system', 'user', 'assistant', 'tool']) THEN
                PERFORM pgml._fail(pg_catalog.format('message %s has an unknown role %L', v_i, v_msg ->> 'role'),
                                   'roles are system, user, assistant (and tool)');
            END IF;
        END LOOP;
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(inputs) e
                  WHERE pg_catalog.jsonb_typeof(e) OPERATOR(pg_catalog.<>) 'string') THEN
        PERFORM pgml._fail('inputs must be texts (a JSON array of strings), with no NULL among them',
                           'e.g. ARRAY[''I love this movie'', ''I hated it'']');
    END IF;

    -- the model: a stored one only if the submitter may read it, and only for a kind its task serves
    IF v_model LIKE 'pgml:%' THEN
        v_ref := pg_catalog.substr(v_model, 6);
        IF v_ref LIKE 'model:%' AND v_ref OPERATOR(pg_catalog.!~) '^model:[0-9]+$' THEN
            PERFORM pgml._fail(pg_catalog.format('model %L: write pgml:model:<id> with a numeric id', v_model),
                               'e.g. pgml:model:42');
        END IF;
    ELSIF v_model OPERATOR(pg_catalog.!~) '[/~]' AND v_model NOT LIKE '.%'
          AND EXISTS (SELECT 1 FROM pgml.projects p WHERE p.name OPERATOR(pg_catalog.=) v_model
                      AND p.owner OPERATOR(pg_catalog.=) submitter) THEN
        v_ref := v_model;  -- a bare project name of the submitter's: that project (a hub id otherwise)
        v_model := 'pgml:' OPERATOR(pg_catalog.||) v_model;
    END IF;
    IF v_ref IS NOT NULL THEN
        SELECT * INTO v_row FROM pgml._serving_model(submitter, v_ref) LIMIT 1;
        IF NOT FOUND THEN
            PERFORM pgml._fail(pg_catalog.format('model %L: there is no %s that %s may use', v_model,
                                   CASE WHEN v_ref LIKE 'model:%' THEN 'such model' ELSE 'successful model in such a project' END,
                                   submitter),
                               'SELECT id, project_id, status FROM pgml.models lists the models you may use',
                               'undefined_object');
        END IF;
        IF v_row.status OPERATOR(pg_catalog.<>) 'successful' THEN
            PERFORM pgml._fail(pg_catalog.format('model %L: model %s is %s, not successful', v_model, v_row.id, v_row.status),
                               'serve a model whose training succeeded');
        END IF;
        IF NOT (kind OPERATOR(pg_catalog.=) ANY (pgml._serving_kinds(v_row.task))) THEN
            PERFORM pgml._fail(pg_catalog.format('model %L is a %s model: it cannot answer a %s request', v_model,
                                                 v_row.task, kind),
                CASE WHEN v_row.task LIKE '%classification' THEN 'use it for text-classification'
                     ELSE 'use it for text-generation or chat' END);
        END IF;
    END IF;

    -- now and then, what nobody will read again goes (a lane with no serving process never grows either)
    IF pg_catalog.random() OPERATOR(pg_catalog.<) 0.01 THEN
        PERFORM pgml._requests_expire();
    END IF;

    INSERT INTO pgml.requests (submitted_by, kind, model, args, inputs, stream, deadline)
    VALUES (submitter, kind, v_model, v_args, inputs, v_stream,
            pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => v_timeout))
    RETURNING id INTO v_id;
    PERFORM pg_catalog.pg_notify('pgml_requests', '{"type": "request_queued"}');
    RETURN v_id;
END $$;

-- The answer to request `id`, once: a finished request (done or failed) is returned and deleted with its chunks;
-- an unfinished one returns its status (queued/running) and stays; an unknown one returns no row (consumed, or
-- expired, or never the caller's). Callers: the request's submitter, or a role that may submit for others.
CREATE OR REPLACE FUNCTION pgml._request_answer(id bigint)
RETURNS TABLE (status text, result jsonb, error text, usage jsonb)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_trusted boolean := pg_catalog.has_function_privilege(pgml._submitter(),
                             'pgml._request_submit(name, text, text, jsonb, jsonb)', 'EXECUTE');
    v_status  text;
BEGIN
    LOOP
        RETURN QUERY
        DELETE FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id AND r.status IN ('done', 'failed')
          AND (v_trusted OR r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter())
        RETURNING r.status, r.result, r.error, r.usage;
        IF FOUND THEN
            RETURN;
        END IF;
        SELECT r.status INTO v_status FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id
          AND (v_trusted OR r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter());
        IF NOT FOUND THEN
            RETURN;  -- consumed, expired, or never the caller's
        END IF;
        -- answered between the DELETE's snapshot and now: consume it (the loop's next DELETE sees it)
        EXIT WHEN v_status NOT IN ('done', 'failed');
    END LOOP;
    status := v_status;
    RETURN NEXT;
END $$;

-- The streamed pieces of request `id` after `after_seq`, in order (read them while it runs; the answer ends it).
CREATE OR REPLACE FUNCTION pgml._request_chunks(id bigint, after_seq integer DEFAULT -1)
RETURNS TABLE (seq integer, text text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.seq, c.text FROM pgml.request_chunks c JOIN pgml.requests r ON r.id OPERATOR(pg_catalog.=) c.request_id
    WHERE c.request_id OPERATOR(pg_catalog.=) _request_chunks.id AND c.seq OPERATOR(pg_catalog.>) after_seq
      AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
           OR pg_catalog.has_function_privilege(pgml._submitter(), 'pgml._request_submit(name, text, text, jsonb, jsonb)',
                                                'EXECUTE'))
    ORDER BY c.seq
$$;

-- The submitter gave up (statement_timeout, cancel): its request goes at once, whatever its state.
CREATE OR REPLACE FUNCTION pgml._request_abandon(id bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM pgml.requests r WHERE r.id OPERATOR(pg_catalog.=) _request_abandon.id
          AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
               OR pg_catalog.has_function_privilege(pgml._submitter(), 'pgml._request_submit(name, text, text, jsonb, jsonb)',
                                                    'EXECUTE'))
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$$;

-- ---- the serving side (pgml_worker) ---------------------------------------------------------------------
-- Claim up to max_n queued requests for serving process `serving_id`, oldest first, grouped by model (the caller
-- batches each group). Claiming counts an attempt; the lease must be renewed while the request runs.
CREATE OR REPLACE FUNCTION pgml._requests_claim(serving_id text, max_n integer, lease_seconds double precision)
RETURNS TABLE (id bigint, submitted_by name, kind text, model text, args jsonb, inputs jsonb, stream boolean,
               attempts integer)
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH picked AS (
        SELECT q.id FROM pgml.requests q
        WHERE q.status OPERATOR(pg_catalog.=) 'queued' AND q.deadline OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()
        ORDER BY q.id
        FOR UPDATE SKIP LOCKED
        LIMIT max_n
    )
    UPDATE pgml.requests r
    SET status = 'running', claimed_by = serving_id, attempts = r.attempts OPERATOR(pg_catalog.+) 1,
        lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
    FROM picked
    WHERE r.id OPERATOR(pg_catalog.=) picked.id
    RETURNING r.id, r.submitted_by, r.kind, r.model, r.args, r.inputs, r.stream, r.attempts
$$;

-- Renew the leases of this serving process's running requests; returns the ids it still owns.
CREATE OR REPLACE FUNCTION pgml._requests_renew(serving_id text, lease_seconds double precision)
RETURNS SETOF bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgml.requests r
    SET lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
    WHERE r.claimed_by OPERATOR(pg_catalog.=) serving_id AND r.status OPERATOR(pg_catalog.=) 'running'
    RETURNING r.id
$$;

-- Answer (result, usage) or fail (error), fenced on the claim: a request taken over after a lost lease is not
-- overwritten. NOTIFY pgml_answers {"type": "request_answered", "id": N} wakes a client waiting for it.
CREATE OR REPLACE FUNCTION pgml._request_finish(id bigint, serving_id text, result jsonb, usage jsonb, error text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE pgml.requests r
    SET status = CASE WHEN _request_finish.error IS NULL THEN 'done' ELSE 'failed' END,
        result = _request_finish.result, usage = _request_finish.usage,
        error = pg_catalog.left(_request_finish.error, 8000),
        answered_at = pg_catalog.clock_timestamp(), lease_expires_at = NULL
    WHERE r.id OPERATOR(pg_catalog.=) _request_finish.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
      AND r.status OPERATOR(pg_catalog.=) 'running';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.pg_notify('pgml_answers',
        pg_catalog.json_build_object('type', 'request_answered', 'id', _request_finish.id)::text);
    RETURN true;
END $$;

-- The answers of a whole batch in one statement (one commit, one NOTIFY each): ids[i] gets results[i]; returns
-- the ids this process still owned (the others were taken over and are not overwritten).
CREATE OR REPLACE FUNCTION pgml._requests_answer(serving_id text, ids bigint[], results jsonb[])
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN
        UPDATE pgml.requests r
        SET status = 'done', result = a.result, answered_at = pg_catalog.clock_timestamp(), lease_expires_at = NULL
        FROM unnest(ids, results) AS a (id, result)
        WHERE r.id OPERATOR(pg_catalog.=) a.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
          AND r.status OPERATOR(pg_catalog.=) 'running'
        RETURNING r.id
    LOOP
        PERFORM pg_catalog.pg_notify('pgml_answers',
            pg_catalog.json_build_object('type', 'request_answered', 'id', v_id)::text);
        RETURN NEXT v_id;
    END LOOP;
END $$;

-- Streamed pieces of a running request: texts[i] gets seq first_seq + i - 1.
CREATE OR REPLACE FUNCTION pgml._request_chunk(id bigint, serving_id text, first_seq integer, texts text[])
RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH owned AS (
        SELECT r.id FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_chunk.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
          AND r.status OPERATOR(pg_catalog.=) 'running'
    ), ins AS (
        INSERT INTO pgml.request_chunks (request_id, seq, text)
        SELECT o.id, first_seq OPERATOR(pg_catalog.+) (t.n OPERATOR(pg_catalog.-) 1)::integer, t.text
        FROM owned o, unnest(texts) WITH ORDINALITY AS t (text, n)
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM owned)
$$;

-- The running requests of a serving process that died (its daemon saw it exit), or of every serving process
-- whose lease ran out: retried once (back to queued, their chunks dropped), then failed saying why.
CREATE OR REPLACE FUNCTION pgml._requests_release(serving_id text DEFAULT NULL)
RETURNS TABLE (id bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    WITH lost AS (
        SELECT r.id FROM pgml.requests r
        WHERE r.status OPERATOR(pg_catalog.=) 'running'
          AND CASE WHEN serving_id IS NULL THEN r.lease_expires_at OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp()
                   ELSE r.claimed_by OPERATOR(pg_catalog.=) serving_id END
        FOR UPDATE SKIP LOCKED
    ), chunks AS (
        DELETE FROM pgml.request_chunks c USING lost WHERE c.request_id OPERATOR(pg_catalog.=) lost.id
    )
    UPDATE pgml.requests r
    SET status = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN 'queued' ELSE 'failed' END,
        error = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN NULL ELSE
            pg_catalog.format('the serving process %s stopped while answering (twice: killed, out of memory, or its '
                              'worker died); the request was not answered', r.claimed_by) END,
        answered_at = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN NULL ELSE pg_catalog.clock_timestamp() END,
        claimed_by = NULL, lease_expires_at = NULL,
        deadline = GREATEST(r.deadline, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) interval '30 seconds')
    FROM lost
    WHERE r.id OPERATOR(pg_catalog.=) lost.id
    RETURNING r.id, r.status;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('pgml_requests', '{"type": "request_queued"}');
    END IF;
END $$;

-- What nobody will read again: requests nobody picked up by their deadline, and answers nobody consumed within
-- a minute (their caller gave up). Returns how many went.
CREATE OR REPLACE FUNCTION pgml._requests_expire() RETURNS bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM pgml.requests r
        WHERE (r.status OPERATOR(pg_catalog.=) 'queued' AND r.deadline OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp())
           OR (r.status IN ('done', 'failed')
               AND r.answered_at OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) interval '60 seconds'))
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM gone
$$;

-- ---- ownership and privileges (the 0008 way) -------------------------------------------------------------
SELECT pgml._own_everything();
REVOKE ALL ON pgml.requests, pgml.request_chunks, pgml.deployments FROM PUBLIC;
REVOKE ALL ON FUNCTION pgml._serving_model(name, text), pgml._serving_kinds(text),
    pgml._request_submit(name, text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_chunks(bigint, integer), pgml._request_abandon(bigint),
    pgml._requests_claim(text, integer, double precision), pgml._requests_renew(text, double precision),
    pgml._request_finish(bigint, text, jsonb, jsonb, text), pgml._requests_answer(text, bigint[], jsonb[]),
    pgml._request_chunk(bigint, text, integer, text[]), pgml._requests_release(text), pgml._requests_expire()
    FROM PUBLIC;
-- submitting for a named login: trusted roles only (the lead's loopback role gets it too)
GRANT EXECUTE ON FUNCTION pgml._request_submit(name, text, text, jsonb, jsonb), pgml._request_answer(bigint),
    pgml._request_chunks(bigint, integer), pgml._request_abandon(bigint) TO pgml_admin;
-- the serving processes
GRANT EXECUTE ON FUNCTION pgml._serving_model(name, text), pgml._requests_claim(text, integer, double precision),
    pgml._requests_renew(text, double precision), pgml._request_finish(bigint, text, jsonb, jsonb, text),
    pgml._requests_answer(text, bigint[], jsonb[]), pgml._request_chunk(bigint, text, integer, text[]),
    pgml._requests_release(text), pgml._requests_expire() TO pgml_worker;
GRANT SELECT ON pgml.deployments TO pgml_user, pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0014_serving') ON CONFLICT DO NOTHING;
