-- 0028_transform_errors: pgml.transform's errors as psql should show them — the message, its HINT and one CONTEXT
-- line — as pgml.tune's since 0021. The three overloads were SQL functions over pgml._transform, and an error raised
-- in the loopback (pgml.request, run by the caller's own role over dblink) came back with six CONTEXT lines, one of
-- them quoting the loopback's statement. Each overload is now PL/pgSQL and raises such an error again itself: the
-- caller sees where it called, not the internals (an error without a HINT too: nothing inside is the caller's to
-- read). Plain SQL, idempotent, runnable with psql.

CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb DEFAULT '{}', inputs text[] DEFAULT ARRAY[]::text[],
                                          cache_model boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql
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
LANGUAGE plpgsql
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
LANGUAGE plpgsql
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

SELECT pgml._own_everything();

INSERT INTO pgml.schema_migrations (version) VALUES ('0028_transform_errors') ON CONFLICT DO NOTHING;
