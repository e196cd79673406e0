-- 0025_request_locks: a pgml.transform caller waits on a lock instead of polling.
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
    ), claimed AS (
        UPDATE pgml.requests r
        SET status = 'running', claimed_by = serving_id, attempts = r.attempts OPERATOR(pg_catalog.+) 1,
            lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
        FROM picked
        WHERE r.id OPERATOR(pg_catalog.=) picked.id
        RETURNING r.id, r.submitted_by, r.kind, r.model, r.args, r.inputs, r.stream, r.attempts
    )
    -- held by this session (the serving process's lane connection) until its answer is committed
    SELECT c.id, c.submitted_by, c.kind, c.model, c.args, c.inputs, c.stream, c.attempts
    FROM claimed c, LATERAL pg_catalog.pg_try_advisory_lock(pgml._request_lock_space(), pgml._request_lock_key(c.id)) l
$$;

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
    v_lock_timeout text := pg_catalog.current_setting('lock_timeout');
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
            IF v_local AND v_status = 'running' THEN
                -- the serving process holds this lock from its claim until its answer is committed: wait on it
                -- instead of polling (no CPU spent, woken the moment the answer is there), a quarter of a second
                -- at a time at most (then the status is read again: a request taken over after a lost lease has
                -- a new holder; anyone may take advisory locks, so a lock held by someone else costs that much)
                PERFORM pg_catalog.set_config('lock_timeout', pg_catalog.format('%sms',
                    greatest(1, least(250, ((p_timeout - coalesce(v_elapsed, 0)) * 1000)::integer))), true);
                BEGIN
                    PERFORM pg_catalog.pg_advisory_lock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                    PERFORM pg_catalog.pg_advisory_unlock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
                PERFORM pg_catalog.set_config('lock_timeout', v_lock_timeout, true);
            ELSE
                PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed IS NULL OR v_elapsed < 0.05 THEN 0.001
                                                 WHEN v_elapsed < 1 THEN 0.005 ELSE 0.02 END);
            END IF;
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

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._request_lock_space(), pgml._request_lock_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._request_lock_space(), pgml._request_lock_key(bigint) TO pgml_worker, pgml_user;
GRANT EXECUTE ON FUNCTION pgml._requests_claim(text, integer, double precision) TO pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0025_request_locks') ON CONFLICT DO NOTHING;
