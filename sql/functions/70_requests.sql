-- Synchronous requests (pgml.transform, pgml.request): rows the serving lane claims, answers in chunks, and the
-- waiting call reads.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

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
        WHEN 'text-embedding' THEN ARRAY['embed']
        WHEN 'text-ranking' THEN ARRAY['rank']
        ELSE ARRAY[]::text[] END
$$;

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
        RETURNING r.status, coalesce(r.result, pgml._vector_literals(r.vectors, r.n_inputs)), r.error, r.usage;
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
-- overwritten. NOTIFY pgml_answers {"type": "request_answered"} wakes the clients waiting (each then looks at its
-- own request): the payload names no request, since any session may LISTEN on any channel.
CREATE OR REPLACE FUNCTION pgml._request_finish(id bigint, serving_id text, result jsonb, usage jsonb, error text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._async_commit();  -- (since 0044) see pgml._requests_claim
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
    PERFORM pg_catalog.pg_notify('pgml_answers', '{"type": "request_answered"}');
    RETURN true;
END $$;

-- The answers of a whole batch in one statement (one commit, one NOTIFY for them all): ids[i] gets results[i];
-- returns the ids this process still owned (the others were taken over and are not overwritten).
-- (since 0044) Or a batch of embed requests' vectors: ids[i] gets counts[i] vectors of `dim` values each, the next
-- ones of `flat` (sent in PostgreSQL's binary array format: no value printed nor parsed; results NULL), which
-- pgml.embed cuts into its rows.
CREATE OR REPLACE FUNCTION pgml._requests_answer(serving_id text, ids bigint[], results jsonb[],
                                                 counts integer[] DEFAULT NULL, dim integer DEFAULT NULL,
                                                 flat real[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF flat IS NOT NULL AND (pg_catalog.cardinality(ids) OPERATOR(pg_catalog.<>) pg_catalog.cardinality(counts)
       OR dim IS NULL OR dim OPERATOR(pg_catalog.<) 1 OR pg_catalog.cardinality(flat) OPERATOR(pg_catalog.<>)
          (dim OPERATOR(pg_catalog.*) (SELECT pg_catalog.sum(c) FROM pg_catalog.unnest(counts) AS c))) THEN
        RAISE EXCEPTION 'pgml._requests_answer: % values are not % requests'' vectors of % values each',
            pg_catalog.cardinality(flat), pg_catalog.cardinality(ids), dim USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgml._async_commit();  -- (since 0044) see pgml._requests_claim
    FOR v_id IN
        UPDATE pgml.requests r
        SET status = 'done', result = a.result,
            vectors = flat[a.first OPERATOR(pg_catalog.*) dim OPERATOR(pg_catalog.+) 1
                           : (a.first OPERATOR(pg_catalog.+) a.n) OPERATOR(pg_catalog.*) dim],
            answered_at = pg_catalog.clock_timestamp(), lease_expires_at = NULL
        FROM (SELECT u.id, u.result, u.n,
                     (pg_catalog.sum(u.n) OVER (ORDER BY u.i) OPERATOR(pg_catalog.-) u.n)::integer AS first
              FROM unnest(ids, results, counts) WITH ORDINALITY AS u (id, result, n, i)) AS a
        WHERE r.id OPERATOR(pg_catalog.=) a.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
          AND r.status OPERATOR(pg_catalog.=) 'running'
          AND (flat IS NULL OR (r.kind OPERATOR(pg_catalog.=) 'embed' AND r.n_inputs OPERATOR(pg_catalog.=) a.n))
        RETURNING r.id
    LOOP
        RETURN NEXT v_id;
    END LOOP;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('pgml_answers', '{"type": "request_answered"}');
    END IF;
END $$;

-- (since 0044) An embed request's vectors (n of them, one after another in `flat`) as the JSON array of real[]
-- literals its answer was before 0044, for the readers of a JSON answer (pgml._request_answer). PL/pgSQL: its
-- argument is detoasted once, not at every slice.
CREATE OR REPLACE FUNCTION pgml._vector_literals(flat real[], n integer) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_dim integer;
BEGIN
    IF flat IS NULL OR n IS NULL OR n OPERATOR(pg_catalog.<) 1 THEN
        RETURN NULL;
    END IF;
    v_dim := pg_catalog.cardinality(flat) OPERATOR(pg_catalog./) n;
    RETURN (SELECT pg_catalog.jsonb_agg(flat[(i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) v_dim OPERATOR(pg_catalog.+) 1
                                             : i OPERATOR(pg_catalog.*) v_dim]::text ORDER BY i)
            FROM pg_catalog.generate_series(1, n) AS i);
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

-- (since 0015) the synchronous entry points of the inference lane and of load_dataset (PostgresML's
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
    RETURN pgml._serve(v_kind, v_model, v_args, inputs);
END $$;

-- (since 0041) One synchronous request of the inference lane, for its caller (pgml.transform, pgml.embed,
-- pgml.rank): submitted through the loopback (committed at once, as the caller: pgml.request checks everything),
-- then waited for (pgml._await_request); returns the answer's result.
CREATE OR REPLACE FUNCTION pgml._serve(kind text, model text, args jsonb, inputs jsonb) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._await_request(pgml._serve_submit(kind, model, args, inputs), pgml._request_timeout(args))
$$;

-- (since 0044) The submitting half of pgml._serve: the request's id. The loopback's transaction commits without
-- waiting for its WAL flush (pgml._quick): a request is worth nothing after a crash (its caller's session is gone
-- with it), and each flush was a millisecond or more of a one-text pgml.embed's time.
CREATE OR REPLACE FUNCTION pgml._serve_submit(kind text, model text, args jsonb, inputs jsonb) RETURNS bigint
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (pgml._loopback(pgml._quick(pg_catalog.format('to_jsonb(pgml.request(%L, %L, %L::jsonb, %L::jsonb))',
                                                         kind, model, args, inputs))) OPERATOR(pg_catalog.#>>) '{}')::bigint
$$;

-- How long a synchronous call waits for its answer: args.timeout (seconds), else 30.
CREATE OR REPLACE FUNCTION pgml._request_timeout(args jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pg_catalog.jsonb_typeof(args -> 'timeout') OPERATOR(pg_catalog.=) 'number'
                THEN (args ->> 'timeout')::double precision ELSE 30 END
$$;

-- (since 0044) A loopback statement (an expression, as pgml._loopback takes it) whose transaction commits without
-- waiting for its WAL to be flushed: for the inference lane's own rows only (a request, its removal), which a crash
-- may lose at no cost. set_config(..., true) holds to the end of the loopback's transaction, whatever the order in
-- which the expression's parts run: the commit is what it changes.
CREATE OR REPLACE FUNCTION pgml._quick(stmt text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format('(SELECT %s FROM (SELECT pg_catalog.set_config(''synchronous_commit'', ''off'', true) '
                             'OFFSET 0) AS quick)', stmt)
$$;

-- (since 0033) The args a request of each kind may carry: one row per (kind, key), with its JSON type and bounds.
-- use: pipeline (the text-classification pipeline's call), generate (model.generate), lane (the lane's own:
-- timeout, stream), ignored (options PostgresML's clients send that the worker decides itself: accepted, never
-- passed on). Anything else (num_workers, device, device_map, torch_dtype, trust_remote_code, model_kwargs, ...) is
-- refused at submit, naming the key and what is allowed; the serving process checks the same table again
-- (serving/inference.py ARGS, which a test keeps equal to this).
CREATE OR REPLACE FUNCTION pgml._request_args()
RETURNS TABLE (kind text, key text, type text, min numeric, max numeric, choices text[], use text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.kind, a.key, a.type, a.min, a.max, a.choices, a.use
    FROM (VALUES ('classify'), ('generate'), ('chat'), ('embed'), ('rank')) AS k (kind)
    JOIN (VALUES
        ('*',        'timeout',              'number',  0.1,  3600, NULL::text[], 'lane'),
        ('*',        'load_in_8bit',         'flag',    NULL, NULL, NULL, 'ignored'),
        ('*',        'load_in_4bit',         'flag',    NULL, NULL, NULL, 'ignored'),
        ('*',        'cache_model',          'flag',    NULL, NULL, NULL, 'ignored'),
        ('classify', 'top_k',                'integer', 1,    1000, NULL, 'pipeline'),
        ('classify', 'function_to_apply',    'string',  NULL, NULL, ARRAY['sigmoid', 'softmax', 'none'], 'pipeline'),
        ('classify', 'truncation',           'boolean', NULL, NULL, NULL, 'pipeline'),
        ('classify', 'max_length',           'integer', 1,    8192, NULL, 'pipeline'),
        ('classify', 'batch_size',           'integer', 1,    64,   NULL, 'pipeline'),
        ('gen',      'stream',               'boolean', NULL, NULL, NULL, 'lane'),
        ('gen',      'max_new_tokens',       'integer', 1,    4096, NULL, 'generate'),
        ('gen',      'max_tokens',           'integer', 1,    4096, NULL, 'generate'),
        ('gen',      'min_new_tokens',       'integer', 0,    4096, NULL, 'generate'),
        ('gen',      'temperature',          'number',  0,    100,  NULL, 'generate'),
        ('gen',      'top_p',                'number',  0,    1,    NULL, 'generate'),
        ('gen',      'top_k',                'integer', 0,    1000, NULL, 'generate'),
        ('gen',      'typical_p',            'number',  0,    1,    NULL, 'generate'),
        ('gen',      'repetition_penalty',   'number',  0.01, 100,  NULL, 'generate'),
        ('gen',      'length_penalty',       'number',  -100, 100,  NULL, 'generate'),
        ('gen',      'no_repeat_ngram_size', 'integer', 0,    64,   NULL, 'generate'),
        ('gen',      'num_beams',            'integer', 1,    8,    NULL, 'generate'),
        ('gen',      'do_sample',            'boolean', NULL, NULL, NULL, 'generate'),
        -- (since 0041) SentenceTransformer.encode's; a CrossEncoder's ranking, cut by pgml.rank itself ('call')
        ('embed',    'normalize',            'boolean', NULL, NULL, NULL, 'encode'),
        ('embed',    'prompt',               'string',  NULL, NULL, NULL, 'encode'),
        ('embed',    'prompt_name',          'string',  NULL, NULL, NULL, 'encode'),
        ('embed',    'truncate_dim',         'integer', 1,    65536, NULL, 'encode'),
        ('rank',     'top_k',                'integer', 1,    1000, NULL, 'call'),
        ('rank',     'return_documents',     'boolean', NULL, NULL, NULL, 'call')
    ) AS a (kinds, key, type, min, max, choices, use)
      ON a.kinds = '*' OR a.kinds = k.kind OR (a.kinds = 'gen' AND k.kind IN ('generate', 'chat'))
$$;

-- Raises unless every key of `args` is allowed for `kind` with a value of its type within its bounds.
CREATE OR REPLACE FUNCTION pgml._request_args_check(kind text, args jsonb) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_bad     text;
    v_allowed text;
    r         record;
    v_num     numeric;
    v_ok      boolean;
    v_a       text := CASE kind WHEN 'embed' THEN 'an embed' ELSE 'a ' OPERATOR(pg_catalog.||) kind END;
BEGIN
    SELECT pg_catalog.string_agg(e.key, ', ' ORDER BY e.key), pg_catalog.count(*) INTO r
    FROM pg_catalog.jsonb_object_keys(args) AS e (key)
    WHERE NOT EXISTS (SELECT 1 FROM pgml._request_args() a
                      WHERE a.kind OPERATOR(pg_catalog.=) _request_args_check.kind
                        AND a.key OPERATOR(pg_catalog.=) e.key);
    v_bad := r.string_agg;
    IF v_bad IS NOT NULL THEN
        SELECT pg_catalog.string_agg(pg_catalog.format('%s (%s)', a.key,
                   CASE WHEN a.choices IS NOT NULL THEN 'one of ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(a.choices, ', ')
                        WHEN a.min IS NOT NULL THEN pg_catalog.format('%s %s..%s', a.type, a.min, a.max)
                        ELSE a.type END), ', ' ORDER BY a.key)
        INTO v_allowed
        FROM pgml._request_args() a
        WHERE a.kind OPERATOR(pg_catalog.=) _request_args_check.kind AND a.use OPERATOR(pg_catalog.<>) 'ignored';
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('args %s %s not allowed in %s request', v_bad,
                                        CASE WHEN r.count OPERATOR(pg_catalog.=) 1 THEN 'is' ELSE 'are' END, v_a),
            HINT = pg_catalog.format('%s request takes: %s (load_in_8bit, load_in_4bit and cache_model are accepted '
                                     'and ignored: the worker decides how it loads a model)', v_a, v_allowed);
    END IF;
    FOR r IN SELECT e.key, e.value, a.type, a.min, a.max, a.choices
             FROM pg_catalog.jsonb_each(args) AS e JOIN pgml._request_args() a
               ON a.kind OPERATOR(pg_catalog.=) _request_args_check.kind AND a.key OPERATOR(pg_catalog.=) e.key
    LOOP
        v_num := CASE WHEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'number' THEN (r.value #>> '{}')::numeric END;
        v_ok := CASE r.type
                WHEN 'integer' THEN v_num IS NOT NULL AND v_num OPERATOR(pg_catalog.=) pg_catalog.trunc(v_num)
                WHEN 'number' THEN v_num IS NOT NULL
                WHEN 'boolean' THEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'boolean'
                WHEN 'string' THEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'string'
                    AND (r.choices IS NULL OR (r.value #>> '{}') OPERATOR(pg_catalog.=) ANY (r.choices))
                ELSE pg_catalog.jsonb_typeof(r.value) IN ('boolean', 'string', 'null') END;
        IF NOT v_ok OR v_num OPERATOR(pg_catalog.<) r.min OR v_num OPERATOR(pg_catalog.>) r.max THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = pg_catalog.format('args.%s = %s: %s request takes %s', r.key, pg_catalog.left(r.value::text, 100), v_a,
                    CASE WHEN r.choices IS NOT NULL THEN 'one of ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(r.choices, ', ')
                         WHEN r.min IS NOT NULL THEN pg_catalog.format('%s %s from %s to %s',
                                  CASE r.type WHEN 'integer' THEN 'a whole number' ELSE 'a number' END, r.key, r.min, r.max)
                         WHEN r.type OPERATOR(pg_catalog.=) 'flag' THEN 'true or false'
                         ELSE pg_catalog.format('a JSON %s', r.type) END),
                HINT = CASE WHEN r.max IS NOT NULL THEN pg_catalog.format('e.g. "%s": %s', r.key, r.max)
                            WHEN r.type OPERATOR(pg_catalog.=) 'boolean' THEN pg_catalog.format('e.g. "%s": true', r.key)
                            ELSE 'see the inference docs' END;
        END IF;
    END LOOP;
END $$;

-- pgml._request_submit: as in 0014, each pgml._fail a RAISE
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
    v_n       integer;
    v_lim     pgml.role_limits;
    v_pending record;
BEGIN
    IF submitter IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = submitter) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('unknown submitter %L', submitter),
            HINT = 'pass the login that asks',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind IS NULL OR kind OPERATOR(pg_catalog.<>) ALL (ARRAY['classify', 'generate', 'chat', 'embed', 'rank']) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('unknown request kind %L', kind),
            HINT = 'kinds are: ''classify'', ''generate'', ''chat'', ''embed'', ''rank''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_model OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION USING MESSAGE = 'a model is required',
            HINT = 'name a Hugging Face model id, pgml:<project> (its deployed model) or pgml:model:<id>',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.jsonb_typeof(v_args) OPERATOR(pg_catalog.<>) 'object' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('args must be a JSON object, got a JSON %s', pg_catalog.jsonb_typeof(v_args)),
            HINT = 'e.g. ''{"max_new_tokens": 32}''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.octet_length(v_args::text) OPERATOR(pg_catalog.>) 65536 THEN
        RAISE EXCEPTION USING MESSAGE = 'args are over 64 KiB',
            HINT = 'pass only the settings the pipeline needs',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a hub token is never stored: gated models are served with the workers' own hub access
    v_args := v_args OPERATOR(pg_catalog.-) pgml._secret_keys();
    v_stream := coalesce(pg_catalog.jsonb_typeof(v_args -> 'stream') OPERATOR(pg_catalog.=) 'boolean'
                         AND (v_args ->> 'stream')::boolean, false);
    IF v_stream AND kind OPERATOR(pg_catalog.=) 'classify' THEN
        RAISE EXCEPTION USING MESSAGE = 'stream is for generation',
            HINT = 'leave "stream" out of a classification''s args',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_args ? 'timeout' THEN
        IF pg_catalog.jsonb_typeof(v_args -> 'timeout') OPERATOR(pg_catalog.<>) 'number'
           OR (v_args ->> 'timeout')::double precision NOT BETWEEN 0.1 AND 3600 THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('args.timeout %s is not a number of seconds from 0.1 to 3600',
                                                 v_args -> 'timeout'),
                HINT = 'e.g. "timeout": 30',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    v_timeout := coalesce((v_args ->> 'timeout')::double precision, 60);

    -- inputs
    IF inputs IS NULL OR pg_catalog.jsonb_typeof(inputs) OPERATOR(pg_catalog.<>) 'array'
       OR pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION USING MESSAGE = 'inputs are empty or NULL',
            HINT = CASE WHEN kind OPERATOR(pg_catalog.=) 'chat' THEN
                'pass the conversation: [{"role": "user", "content": "..."}]'
            ELSE 'pass at least one text, e.g. ARRAY[''I love this movie'']' END,
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.octet_length(inputs::text) OPERATOR(pg_catalog.>) 1048576 THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('inputs are %s bytes, over the limit of 1 MiB',
                                             pg_catalog.octet_length(inputs::text)),
            HINT = 'split them into several calls (or a batch job over a table)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.>) 1000 THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('%s inputs, over the limit of 1000 per call',
                                             pg_catalog.jsonb_array_length(inputs)),
            HINT = 'split them into several calls (or a batch job over a table)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind OPERATOR(pg_catalog.=) 'chat' THEN
        FOR v_msg IN SELECT e FROM pg_catalog.jsonb_array_elements(inputs) e LOOP
            v_i := v_i OPERATOR(pg_catalog.+) 1;
            IF pg_catalog.jsonb_typeof(v_msg) OPERATOR(pg_catalog.<>) 'object'
               OR pg_catalog.jsonb_typeof(v_msg -> 'role') IS DISTINCT FROM 'string'
               OR pg_catalog.jsonb_typeof(v_msg -> 'content') IS DISTINCT FROM 'string' THEN
                RAISE EXCEPTION USING MESSAGE = pg_catalog.format('message %s is malformed: %s', v_i, pg_catalog.left(v_msg::text, 200)),
                    HINT = 'each message is {"role": "system"|"user"|"assistant", "content": "text"}',
                    ERRCODE = 'invalid_parameter_value';
            END IF;
            IF (v_msg ->> 'role') OPERATOR(pg_catalog.<>) ALL (ARRAY['system', 'user', 'assistant', 'tool']) THEN
                RAISE EXCEPTION USING MESSAGE = pg_catalog.format('message %s has an unknown role %L', v_i, v_msg ->> 'role'),
                    HINT = 'roles are system, user, assistant (and tool)',
                    ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(inputs) e
                  WHERE pg_catalog.jsonb_typeof(e) OPERATOR(pg_catalog.<>) 'string') THEN
        RAISE EXCEPTION USING MESSAGE = 'inputs must be texts (a JSON array of strings), with no NULL among them',
            HINT = 'e.g. ARRAY[''I love this movie'', ''I hated it'']',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- the model: a stored one only if the submitter may read it, and only for a kind its task serves
    v_model := pgml._own_project_ref(v_model, submitter);  -- a bare project name of the submitter's: that project
    IF v_model LIKE 'pgml:%' THEN
        v_ref := pg_catalog.substr(v_model, 6);
        IF v_ref LIKE 'model:%' AND v_ref OPERATOR(pg_catalog.!~) '^model:[0-9]+$' THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: write pgml:model:<id> with a numeric id', v_model),
                HINT = 'e.g. pgml:model:42',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF v_ref IS NOT NULL THEN
        SELECT * INTO v_row FROM pgml._serving_model(submitter, v_ref) LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: there is no %s that %s may use', v_model,
                                   CASE WHEN v_ref LIKE 'model:%' THEN 'such model' ELSE 'successful model in such a project' END,
                                   submitter),
                HINT = 'SELECT id, project_id, status FROM pgml.models lists the models you may use',
                ERRCODE = 'undefined_object';
        END IF;
        IF v_row.status OPERATOR(pg_catalog.<>) 'successful' THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: model %s is %s, not successful', v_model, v_row.id, v_row.status),
                HINT = 'serve a model whose training succeeded',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT (kind OPERATOR(pg_catalog.=) ANY (pgml._serving_kinds(v_row.task))) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L is a %s model: it cannot answer %s request', v_model,
                                                 v_row.task,
                                                 CASE kind WHEN 'embed' THEN 'an embed' ELSE 'a ' OPERATOR(pg_catalog.||) kind END),
                HINT = CASE WHEN v_row.task LIKE '%classification' THEN 'use it for text-classification'
                     WHEN v_row.task OPERATOR(pg_catalog.=) 'text-embedding' THEN 'use it with pgml.embed'
                     WHEN v_row.task OPERATOR(pg_catalog.=) 'text-ranking' THEN 'use it with pgml.rank'
                     ELSE 'use it for text-generation or chat' END,
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    -- (since 0033) only the args of the allow-list, within their bounds
    PERFORM pgml._request_args_check(kind, v_args);

    -- (since 0033) what one login may have pending in the lane: requests, and their texts all together. Counted
    -- without a lock (a lock by login name is one anybody could hold): concurrent submits of one login may pass a
    -- cap by as many as it has sessions submitting at once
    v_n := CASE WHEN kind OPERATOR(pg_catalog.=) 'chat' THEN 1 ELSE pg_catalog.jsonb_array_length(inputs) END;
    v_lim := pgml._role_limits(submitter);
    IF v_lim.max_pending_requests IS NOT NULL OR v_lim.max_pending_inputs IS NOT NULL THEN
        SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(r.n_inputs), 0) AS texts INTO v_pending
        FROM pgml.requests r
        WHERE r.submitted_by OPERATOR(pg_catalog.=) submitter AND r.status IN ('queued', 'running');
        IF v_pending.n OPERATOR(pg_catalog.>=) v_lim.max_pending_requests THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = pg_catalog.format('%s has %s requests pending in the inference lane; the limit for %s is %s '
                                            '(pgml.role_limits.max_pending_requests)', submitter, v_pending.n,
                                            v_lim.role, v_lim.max_pending_requests),
                HINT = 'wait for their answers before sending more (or send more texts per request), or ask an '
                       'administrator to raise pgml.role_limits.max_pending_requests';
        END IF;
        IF v_pending.texts OPERATOR(pg_catalog.+) v_n OPERATOR(pg_catalog.>) v_lim.max_pending_inputs THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = pg_catalog.format('%s has %s texts pending in the inference lane and this request adds %s; the '
                                            'limit for %s is %s (pgml.role_limits.max_pending_inputs)', submitter,
                                            v_pending.texts, v_n, v_lim.role, v_lim.max_pending_inputs),
                HINT = 'wait for their answers before sending more, use pgml.predict_batch for a whole table, or ask '
                       'an administrator to raise pgml.role_limits.max_pending_inputs';
        END IF;
    END IF;

    -- now and then, what nobody will read again goes (a lane with no serving process never grows either)
    IF pg_catalog.random() OPERATOR(pg_catalog.<) 0.01 THEN
        PERFORM pgml._requests_expire();
    END IF;

    INSERT INTO pgml.requests (submitted_by, kind, model, args, inputs, stream, deadline, n_inputs)
    VALUES (submitter, kind, v_model, v_args, inputs, v_stream,
            pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => v_timeout), v_n)
    RETURNING id INTO v_id;
    PERFORM pg_catalog.pg_notify('pgml_requests', '{"type": "request_queued"}');
    RETURN v_id;
END $$;

-- (since 0025) a pgml.transform caller waits on a lock instead of polling.
-- The serving process takes a session-level advisory lock on each request it claims (on its lane connection, in the
-- claim statement, so the lock is held before the claim is visible) and releases it after its answer is committed
-- (serving/requests.py). A caller that sees its request running waits for that lock (shared), then reads the
-- answer: no pg_sleep polling every 1-5 ms by every waiting session (CPU the model needs on a small machine, and up
-- to 5 ms between an answer and its caller noticing it). A request not yet claimed is still polled; a lock that
-- was never taken (the serving process's connection broke: its locks went with it) is acquired at once, and the
-- caller falls back to polling.

-- The advisory lock of a request: (space, key) of pg_advisory_lock(int, int).
CREATE OR REPLACE FUNCTION pgml._request_lock_space() RETURNS integer
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 1885826412 $$;  -- 'pgml' as bytes

CREATE OR REPLACE FUNCTION pgml._request_lock_key(id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT (id OPERATOR(pg_catalog.%) 2147483647)::integer $$;

-- (since 0033) Fair: round-robin across submitters, weighted by texts. Each submitter's queued requests are taken
-- in order (requests_pending_idx, walked once per submitter: the distinct submitters by a skip scan of the same
-- index), each placed at its submitter's texts up to and including it; the claim takes the lowest places first
-- (ties: the older request), up to max_n requests and, past the first, max_inputs texts. A submitter of one
-- short request goes before another's thousandth text, whoever came first; two submitters of equal requests
-- alternate. Rows come back in that order (the serving process answers them so).
CREATE OR REPLACE FUNCTION pgml._requests_claim(serving_id text, max_n integer, lease_seconds double precision,
                                                max_inputs integer DEFAULT 512)
RETURNS TABLE (id bigint, submitted_by name, kind text, model text, args jsonb, inputs jsonb, stream boolean,
               attempts integer)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- PL/pgSQL, not SQL: its plan is kept for the session (before PostgreSQL 18 a SQL function's statement is planned
    -- at every call, 0.4 ms of every claim on PostgreSQL 15)
    RETURN QUERY
    WITH RECURSIVE submitters AS (
        (SELECT q.submitted_by FROM pgml.requests q
         WHERE q.status IN ('queued', 'running')
         ORDER BY q.submitted_by LIMIT 1)
        UNION ALL
        SELECT (SELECT q.submitted_by FROM pgml.requests q
                WHERE q.status IN ('queued', 'running') AND q.submitted_by OPERATOR(pg_catalog.>) s.submitted_by
                ORDER BY q.submitted_by LIMIT 1)
        FROM submitters s WHERE s.submitted_by IS NOT NULL
    ), placed AS (
        SELECT c.id, c.n_inputs, c.place
        FROM submitters s, LATERAL (
            SELECT q.id, q.n_inputs, pg_catalog.sum(q.n_inputs) OVER (ORDER BY q.id) AS place
            FROM pgml.requests q
            WHERE q.submitted_by OPERATOR(pg_catalog.=) s.submitted_by AND q.status IN ('queued', 'running')
              AND q.status OPERATOR(pg_catalog.=) 'queued'
              AND q.deadline OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()
            ORDER BY q.id
            LIMIT max_n
        ) c
        WHERE s.submitted_by IS NOT NULL
    ), chosen AS (
        SELECT x.id, x.rank FROM (
            SELECT p.id, pg_catalog.row_number() OVER w AS rank,
                   pg_catalog.sum(p.n_inputs) OVER w OPERATOR(pg_catalog.-) p.n_inputs AS before
            FROM placed p
            WINDOW w AS (ORDER BY p.place, p.id)
        ) x
        WHERE x.rank OPERATOR(pg_catalog.<=) max_n
          AND (x.rank OPERATOR(pg_catalog.=) 1 OR x.before OPERATOR(pg_catalog.<) max_inputs)
    ), picked AS (
        SELECT q.id, ch.rank FROM pgml.requests q JOIN chosen ch ON ch.id OPERATOR(pg_catalog.=) q.id
        WHERE q.status OPERATOR(pg_catalog.=) 'queued'
        FOR UPDATE OF q SKIP LOCKED
    ), claimed AS (
        UPDATE pgml.requests r
        SET status = 'running', claimed_by = serving_id, attempts = r.attempts OPERATOR(pg_catalog.+) 1,
            lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
        FROM picked
        WHERE r.id OPERATOR(pg_catalog.=) picked.id
        RETURNING r.id, r.submitted_by, r.kind, r.model, r.args, r.inputs, r.stream, r.attempts, picked.rank
    )
    -- held by this session (the serving process's lane connection) until its answer is committed
    SELECT c.id, c.submitted_by, c.kind, c.model, c.args, c.inputs, c.stream, c.attempts
    FROM claimed c, LATERAL pg_catalog.pg_try_advisory_lock(pgml._request_lock_space(), pgml._request_lock_key(c.id)) l,
         -- (since 0044) the serving process's writes here (its claims and answers, each a transaction of its own)
         -- commit without waiting for their WAL flush (pgml._async_commit): a lost claim is claimed again, a lost
         -- answer's request is released when its lease runs out and answered again; a flush is a millisecond or more
         -- of every one-text call
         pgml._async_commit() AS quick
    ORDER BY c.rank;
END $$;

-- The answer of request p_id, once it is there: its result, or (since 0044) an embed request's vectors with result
-- NULL; its error raised again. Read in the caller's own snapshot where it can see the answer (read committed), else
-- taken through the loopback (then vectors come as result: pgml._request_answer's JSON).
CREATE OR REPLACE FUNCTION pgml._await_answer(p_id bigint, p_timeout double precision, OUT result jsonb,
                                              OUT vectors real[])
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_start   timestamptz := pg_catalog.clock_timestamp();
    v_local   boolean := pg_catalog.current_setting('transaction_isolation') = 'read committed';
    v_status  text;
    v_worker  text;
    v_answer  jsonb;
    v_error   text;
    v_elapsed double precision;
    v_lock_timeout text := pg_catalog.current_setting('lock_timeout');
    v_got_lock boolean := false;  -- the last turn took the request's lock: if it is still running, nobody holds it
BEGIN
    BEGIN
        LOOP
            IF v_local THEN
                SELECT r.status, r.claimed_by INTO v_status, v_worker FROM pgml.requests r WHERE r.id = p_id;
            ELSE  -- a snapshot that cannot see the answer: ask through the loopback (a finished one is taken)
                v_answer := pgml._loopback(pgml._quick(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id)));
                v_status := v_answer ->> 'status';
            END IF;
            EXIT WHEN v_status IS NULL OR v_status IN ('done', 'failed');
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
            IF v_elapsed > p_timeout THEN
                PERFORM pgml._loopback(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
                IF v_status = 'queued' THEN
                    RAISE EXCEPTION 'no pgml-tuned worker is serving: the request waited % s and nobody took it',
                        round(v_elapsed::numeric, 1)
                        USING ERRCODE = 'lock_not_available',
                              HINT = 'start one (pgml-tuned serve) or check SELECT * FROM pgml.queue_summary; '
                                     'args => ''{"timeout": 120}'' waits longer';
                END IF;
                RAISE EXCEPTION 'the request timed out after % s while % was answering it',
                    round(v_elapsed::numeric, 1), coalesce(v_worker, 'a worker')
                    USING ERRCODE = 'query_canceled',
                          HINT = 'args => ''{"timeout": 300}'' waits longer (long generations need it)';
            END IF;
            IF v_local AND v_status = 'running' AND NOT v_got_lock THEN
                -- the serving process holds this lock from its claim until its answer is committed: wait on it
                -- instead of polling (no CPU spent, woken the moment the answer is there), a quarter of a second
                -- at a time at most (then the status is read again: a request taken over after a lost lease has
                -- a new holder; anyone may take advisory locks, so a lock held by someone else costs that much)
                PERFORM pg_catalog.set_config('lock_timeout', pg_catalog.format('%sms',
                    greatest(1, least(250, ((p_timeout - coalesce(v_elapsed, 0)) * 1000)::integer))), true);
                BEGIN
                    PERFORM pg_catalog.pg_advisory_lock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                    PERFORM pg_catalog.pg_advisory_unlock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                    v_got_lock := true;
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
                PERFORM pg_catalog.set_config('lock_timeout', v_lock_timeout, true);
            ELSE
                -- queued, or running with nobody holding its lock (its serving process's lane connection broke: the
                -- locks went with it, and the lease runs out before another claims it): poll, then try the lock
                -- again (a new holder's), rather than take a free lock in a tight loop
                PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed IS NULL OR v_elapsed < 0.05 THEN 0.001
                                                 WHEN v_elapsed < 1 THEN 0.005 ELSE 0.02 END);
                v_got_lock := false;
            END IF;
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        -- statement_timeout or a cancel: leave nothing behind
        PERFORM pgml._loopback(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
        RAISE;
    END;
    IF v_local AND v_status IS NOT NULL THEN
        -- read here (this statement sees the serving process's commit), and only deleted through the
        -- loopback: an answer of 1,000 vectors is not printed, sent over the loopback and parsed again. The
        -- deletion is sent without waiting for it (pgml._loopback_send): the caller has its answer now
        SELECT r.status, r.result, r.vectors, r.error INTO v_status, result, vectors, v_error
        FROM pgml.requests r WHERE r.id = p_id;
        IF FOUND THEN
            PERFORM pgml._loopback_send(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
        END IF;
    ELSE
        IF v_local OR v_status IS NULL THEN
            v_answer := pgml._loopback(pgml._quick(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id)));
        END IF;
        v_status := v_answer ->> 'status';
        result := v_answer -> 'result';
        v_error := v_answer ->> 'error';
    END IF;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'request % is gone (it expired, or its serving process failed it twice)', p_id
            USING ERRCODE = 'no_data_found', HINT = 'try again; pgml-tuned status shows the serving workers';
    END IF;
    IF v_status = 'failed' THEN
        RAISE EXCEPTION '%', v_error USING ERRCODE = 'data_exception';
    END IF;
END $$;

-- The answer's result of request p_id, once it is there (pgml._await_answer).
CREATE OR REPLACE FUNCTION pgml._await_request(p_id bigint, p_timeout double precision) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.result FROM pgml._await_answer(p_id, p_timeout) a
$$;

-- (since 0028) pgml.transform's errors as psql should show them — the message, its HINT and one CONTEXT
-- line — as pgml.tune's since 0021. The three overloads were SQL functions over pgml._transform, and an error raised
-- in the loopback (pgml.request, run by the caller's own role over dblink) came back with six CONTEXT lines, one of
-- them quoting the loopback's statement. Each overload is now PL/pgSQL and raises such an error again itself: the
-- caller sees where it called, not the internals (an error without a HINT too: nothing inside is the caller's to
-- read). They are SECURITY DEFINER, so pgml._transform is not pgml_user's to call: nothing in them reads as the caller
-- (who the request is for is session_user, through pgml._submitter).

CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb DEFAULT '{}', inputs text[] DEFAULT ARRAY[]::text[],
                                          cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(task, args, pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

CREATE OR REPLACE FUNCTION pgml.transform(task text, args jsonb DEFAULT '{}', inputs text[] DEFAULT ARRAY[]::text[],
                                          cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(pg_catalog.jsonb_build_object('task', task) || coalesce(args -> 'task_args', '{}'),
                           args - 'task_args', pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

-- Conversations: inputs are the messages, [{"role": "user", "content": "..."}, ...].
CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb, inputs jsonb[], cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(task, args, pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

-- (since 0041) Retrieval: pgml.embed and pgml.rank, PostgresML's signatures, on the inference lane (requests of
-- kinds 'embed' and 'rank'; kwargs are the request's args, checked by pgml._request_args_check: normalize, prompt,
-- prompt_name, truncate_dim for embed; top_k, return_documents for rank; timeout for both). `transformer` is what
-- pgml.transform's model is: a hub id, pgml:<project> (its deployed model), pgml:model:<id>, one of the caller's
-- project names, or a directory of the administrators' model directories. Errors are raised again as
-- pgml.transform's are (0028): the message, its HINT and one CONTEXT line.

-- The vectors of an embed request's answer, in order. The answer is a JSON array of strings, each a
-- real[] literal with nine significant digits per value (the float32 the serving process computed comes back
-- exactly): a string is cast, no JSON number is parsed (parsing 384,000 of them into numeric and printing them again
-- took longer than the model's forward pass over 1,000 short texts).
CREATE OR REPLACE FUNCTION pgml._vectors(result jsonb) RETURNS SETOF real[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (v.value OPERATOR(pg_catalog.#>>) '{}'::text[])::real[]
    FROM pg_catalog.jsonb_array_elements(result) WITH ORDINALITY AS v (value, n)
    ORDER BY v.n
$$;

-- (since 0044) The vectors of `inputs` by `transformer`, in order: one embed request through pgml._serve's two
-- halves; the answer's flat float4 array cut into rows (a PL/pgSQL variable: detoasted once, each row a slice), or,
-- for an answer read through the loopback (a repeatable-read caller), its JSON.
CREATE OR REPLACE FUNCTION pgml._embedded(transformer text, kwargs jsonb, inputs text[]) RETURNS SETOF real[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_answer  record;
    v_vectors real[];
    v_dim     integer;
BEGIN
    SELECT a.result, a.vectors INTO v_answer
    FROM pgml._await_answer(pgml._serve_submit('embed', transformer, kwargs, pg_catalog.to_jsonb(inputs)),
                            pgml._request_timeout(kwargs)) a;
    IF v_answer.vectors IS NULL THEN
        RETURN QUERY SELECT v FROM pgml._vectors(v_answer.result) v;
        RETURN;
    END IF;
    v_vectors := v_answer.vectors;
    v_dim := pg_catalog.cardinality(v_vectors) OPERATOR(pg_catalog./) pg_catalog.cardinality(inputs);
    RETURN QUERY
    SELECT v_vectors[(i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) v_dim OPERATOR(pg_catalog.+) 1
                     : i OPERATOR(pg_catalog.*) v_dim]
    FROM pg_catalog.generate_series(1, pg_catalog.cardinality(inputs)) AS i
    ORDER BY i;
END $$;

-- A model name as the inference calls take it: the bare name of one of `who`'s projects is that project
-- (pgml:<name>); anything else as given (a hub id, pgml:..., a directory). It runs with its caller's rights (row-level
-- security: a user finds only its own projects): pgml._request_submit (as the owner) and pgml.embed_batch (as the
-- user) call it.
CREATE OR REPLACE FUNCTION pgml._own_project_ref(model text, who name) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN model !~ '[/~:]' AND model NOT LIKE '.%'
                     AND EXISTS (SELECT 1 FROM pgml.projects p WHERE p.name = model AND p.owner = who)
                THEN 'pgml:' || model ELSE model END
$$;

-- Checks what pgml.embed and pgml.rank check before a request (the rest is pgml._request_submit's); for
-- pgml.embed_batch (which runs as its caller, and sends no request) the kwargs too.
CREATE OR REPLACE FUNCTION pgml._retrieval_call(fn text, transformer text, kwargs jsonb) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF transformer IS NULL OR pg_catalog.btrim(transformer) OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s needs a transformer (the model)', fn),
            HINT = 'a hub id, pgml:<project> (its deployed model), pgml:model:<id>, or one of your project names';
    END IF;
    IF kwargs IS NULL OR pg_catalog.jsonb_typeof(kwargs) OPERATOR(pg_catalog.<>) 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s: kwargs must be a JSON object, not %s', fn,
                                        coalesce(pg_catalog.jsonb_typeof(kwargs), 'NULL')),
            HINT = CASE fn WHEN 'embed' THEN 'e.g. ''{"normalize": true}''' ELSE 'e.g. ''{"top_k": 10}''' END;
    END IF;
    IF kwargs ? 'prompt' AND kwargs ? 'prompt_name' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s: kwargs prompt and prompt_name are both given', fn),
            HINT = 'pass one: "prompt" is the text put before each input, "prompt_name" names one of the model''s '
                   'prompts (e.g. "query")';
    END IF;
    IF fn OPERATOR(pg_catalog.=) 'embed_batch' THEN
        IF kwargs ? 'timeout' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'pgml.embed_batch: kwargs.timeout is for pgml.embed',
                HINT = 'a batch job has no timeout: leave it out (pgml.cancel stops a job)';
        END IF;
        PERFORM pgml._request_args_check('embed', kwargs);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgml.embed(transformer text, "text" text, kwargs jsonb DEFAULT '{}') RETURNS real[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('embed', transformer, kwargs);
    IF embed.text IS NULL THEN
        RETURN NULL;  -- a row with no text gets no vector (UPDATE ... SET embedding = pgml.embed(...))
    END IF;
    RETURN (SELECT v FROM pgml._embedded(transformer, kwargs, ARRAY[embed.text]) v LIMIT 1);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

-- One vector per input, in order (one request: up to 1000 texts).
CREATE OR REPLACE FUNCTION pgml.embed(transformer text, inputs text[], kwargs jsonb DEFAULT '{}') RETURNS SETOF real[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('embed', transformer, kwargs);
    IF pg_catalog.cardinality(inputs) OPERATOR(pg_catalog.=) 0 THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT v FROM pgml._embedded(transformer, kwargs, inputs) v;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

-- The documents by the cross-encoder's score for the query, best first: corpus_id is a document's place in
-- `documents` counted from 0 (sentence-transformers' CrossEncoder.rank), text the document (NULL with
-- "return_documents": false), at most "top_k" rows (all by default).
CREATE OR REPLACE FUNCTION pgml.rank(transformer text, query text, documents text[], kwargs jsonb DEFAULT '{}')
RETURNS TABLE (corpus_id integer, score double precision, text text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_scores jsonb;
    v_docs   boolean;
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('rank', transformer, kwargs);
    IF query IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'pgml.rank: the query is NULL',
            HINT = 'pass the text the documents are ranked for';
    END IF;
    IF pg_catalog.cardinality(documents) OPERATOR(pg_catalog.=) 0 THEN
        RETURN;
    END IF;
    v_scores := pgml._serve('rank', transformer, kwargs, pg_catalog.to_jsonb(ARRAY[query] OPERATOR(pg_catalog.||) documents));
    v_docs := coalesce((kwargs ->> 'return_documents')::boolean, true);
    RETURN QUERY
    SELECT (s.n OPERATOR(pg_catalog.-) 1)::integer, (s.value #>> '{}')::double precision,
           CASE WHEN v_docs THEN documents[s.n::integer] END
    FROM pg_catalog.jsonb_array_elements(v_scores) WITH ORDINALITY AS s (value, n)
    ORDER BY (s.value #>> '{}')::double precision DESC, s.n
    LIMIT (kwargs ->> 'top_k')::numeric::bigint;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;
