-- 0024_job_tables: the rows a job copies at submit time go into a table of the job's own,
-- pgml_rows.job_<id> (c1 .. ck text, exactly the job's columns), instead of all jobs' rows in pgml.job_rows.
-- Measured with bench/submit.py (25,000 IMDB-sized rows, server CPU per statement, PostgreSQL 15): copying into the
-- shared table cost 91 ms against 59 ms for a plain INSERT ... SELECT of the same rows (0.65x); its parts were the
-- count(*) afterwards (~11 ms), the BRIN index (~6), row_number() for the order (~5), the job_id column and eight
-- columns where two are used (~5), and reusing the vacuumed pages of earlier jobs (~4). A table of its own needs
-- none of them: the rows are in insertion order (one writer, appended, never updated), its size is
-- pg_total_relation_size, the INSERT counts the rows, and the end of the job drops the table, which returns the
-- space at once (no DELETE, no VACUUM: the database no longer grows with every job).
-- The tables live in schema pgml_rows, where only pgml_owner may create anything (nobody can take a future job's
-- name first). The submitter may INSERT into its job's table only while pgml.tune() runs (pgml._submitted revokes
-- it) and may read it until the job ends, as it read its rows in pgml.job_rows before; pgml_admin may read them.
-- Jobs submitted before this migration keep their rows in pgml.job_rows and are read from there.
-- pgml._submitted(job_id) without a count keeps counting (load_dataset, tune_requests).

CREATE SCHEMA IF NOT EXISTS pgml_rows;
ALTER SCHEMA pgml_rows OWNER TO pgml_owner;
REVOKE ALL ON SCHEMA pgml_rows FROM PUBLIC;
GRANT USAGE ON SCHEMA pgml_rows TO pgml_user, pgml_admin;

DROP FUNCTION IF EXISTS pgml._submitted(bigint);

-- The name of a job's table (schema pgml_rows).
CREATE OR REPLACE FUNCTION pgml._job_table(job_id bigint) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'job_' || job_id::text $$;

-- Creates the table a job being submitted copies its rows into, and lets the submitter fill it; returns its
-- qualified name. Called by pgml.tune() right after pgml._submit().
CREATE OR REPLACE FUNCTION pgml._job_table_begin(job_id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who  name := pgml._submitter();
    v_cols text[];
    v_name text := pgml._job_table(_job_table_begin.job_id);
BEGIN
    SELECT j.snapshot_columns INTO v_cols FROM pgml.jobs j
    WHERE j.id = _job_table_begin.job_id AND j.submitted_by = v_who AND j.status = 'submitting';
    IF v_cols IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = pg_catalog.format('job %s is not being submitted by %s with a relation', _job_table_begin.job_id,
                                        v_who),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    IF pg_catalog.cardinality(v_cols) > 8 THEN
        RAISE EXCEPTION 'a job copies at most 8 columns, not %', pg_catalog.cardinality(v_cols)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    -- written once, read once or twice, then dropped: autovacuum has nothing to do on it
    EXECUTE pg_catalog.format(
        'CREATE TABLE pgml_rows.%I (%s) WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)',
        v_name, (SELECT pg_catalog.string_agg(pg_catalog.format('c%s text', i), ', ' ORDER BY i)
                 FROM pg_catalog.generate_series(1, pg_catalog.cardinality(v_cols)) AS i));
    EXECUTE pg_catalog.format('GRANT INSERT, SELECT ON pgml_rows.%I TO %I', v_name, v_who);
    EXECUTE pg_catalog.format('GRANT SELECT ON pgml_rows.%I TO pgml_admin', v_name);
    RETURN pg_catalog.format('pgml_rows.%I', v_name);
END $$;

-- Drops the tables of these jobs (their end, or their deletion) and of any other job that has ended or is gone,
-- unless an ended job keeps its snapshot (tune(materialize_snapshot => true); only its deletion drops that one).
-- A table someone is reading right now (a submitter's open transaction holds a lock on it) is left for a later
-- call: the worker's commit of a job's end never waits on a user's lock.
CREATE OR REPLACE FUNCTION pgml._job_tables_drop(job_ids bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
    v_timeout text := pg_catalog.current_setting('lock_timeout');
BEGIN
    PERFORM pg_catalog.set_config('lock_timeout', '50ms', true);
    FOR v_name IN
        SELECT c.relname FROM pg_catalog.pg_class c
        LEFT JOIN pgml.jobs j ON j.id = CASE WHEN c.relname ~ '^job_[0-9]{1,18}$'
                                             THEN pg_catalog.substr(c.relname::text, 5)::bigint END
        WHERE c.relnamespace = 'pgml_rows'::regnamespace AND c.relkind = 'r'
          AND (c.relname = ANY (SELECT pgml._job_table(i) FROM pg_catalog.unnest(job_ids) AS i)
               OR j.id IS NULL
               OR (j.status IN ('succeeded', 'failed', 'cancelled') AND NOT j.keep_snapshot))
          AND NOT (j.id IS NOT NULL AND j.status NOT IN ('succeeded', 'failed', 'cancelled'))
          AND NOT (j.id IS NOT NULL AND j.keep_snapshot AND j.id <> ALL (job_ids))
    LOOP
        BEGIN
            EXECUTE pg_catalog.format('DROP TABLE pgml_rows.%I', v_name);
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- in use: the next job's end (or pgml-tuned gc) drops it
        END;
    END LOOP;
    PERFORM pg_catalog.set_config('lock_timeout', v_timeout, true);
END $$;

CREATE OR REPLACE FUNCTION pgml._job_table_ended() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._job_tables_drop(ARRAY[NEW.id]);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS jobs_table_ended ON pgml.jobs;
CREATE TRIGGER jobs_table_ended AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status
          AND NOT NEW.keep_snapshot)
    EXECUTE FUNCTION pgml._job_table_ended();

CREATE OR REPLACE FUNCTION pgml._job_tables_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._job_tables_drop((SELECT pg_catalog.array_agg(g.id) FROM gone g));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS jobs_tables_deleted ON pgml.jobs;
CREATE TRIGGER jobs_tables_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_tables_deleted();

-- The rows pgml.tune() copied for this job, in their order, as arrays (jobs.snapshot_columns names them). A job's
-- own table is read in its physical order, which is the order its one INSERT wrote (synchronize_seqscans off: a
-- synchronized scan may start in the middle of a large table); rows of older jobs come from pgml.job_rows.
CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET synchronize_seqscans = off
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_rows.job_id, ticket);
    k integer := coalesce(pg_catalog.cardinality(v.snapshot_columns), 8);
    v_name text := pgml._job_table(_child_rows.job_id);
BEGIN
    IF pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', v_name)) IS NOT NULL THEN
        RETURN QUERY EXECUTE pg_catalog.format(
            'SELECT ARRAY[%s] FROM pgml_rows.%I',
            (SELECT pg_catalog.string_agg(pg_catalog.format('c%s', i), ', ' ORDER BY i)
             FROM pg_catalog.generate_series(1, k) AS i), v_name);
        RETURN;
    END IF;
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $$;

CREATE OR REPLACE FUNCTION pgml._submitted(job_id bigint, copied bigint DEFAULT NULL) RETURNS bigint
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
    v_table regclass;
BEGIN
    SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = v_who;
    IF NOT FOUND AND NOT pg_has_role(v_who, 'pgml_admin', 'MEMBER') THEN
        SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = 'pgml_user';
    END IF;
    v_table := pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', pgml._job_table(_submitted.job_id)));
    IF v_table IS NOT NULL THEN
        -- the job's own table: its size is known without reading it, the INSERT counted its rows (the count comes
        -- from the caller, so what matters is checked here: at least two rows are there), and the submitter may
        -- add no more once the job is queued
        EXECUTE pg_catalog.format('REVOKE INSERT ON %s FROM %I', v_table, v_who);
        v_bytes := pg_catalog.pg_total_relation_size(v_table);
        EXECUTE pg_catalog.format('SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 2) s', v_table) INTO v_rows;
        IF v_rows >= 2 AND copied IS NOT NULL THEN
            v_rows := greatest(copied, 2);
        ELSIF v_rows >= 2 THEN
            EXECUTE pg_catalog.format('SELECT count(*) FROM %s', v_table) INTO v_rows;
        END IF;
    -- older jobs' rows in pgml.job_rows: the size is summed only when it could be over the limit
    ELSIF v_lim.max_snapshot_bytes IS NOT NULL
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

CREATE OR REPLACE FUNCTION pgml.tune(
    project_name         text,
    task                 text DEFAULT NULL,
    relation_name        text DEFAULT NULL,
    y_column_name        text DEFAULT NULL,
    model_name           text DEFAULT NULL,
    hyperparams          jsonb DEFAULT '{}',
    test_size            double precision DEFAULT 0.25,
    test_sampling        text DEFAULT 'stratified',
    automatic_deploy     boolean DEFAULT true,
    materialize_snapshot boolean DEFAULT false,
    max_attempts         integer DEFAULT 3,
    priority             integer DEFAULT 0,
    caller_search_path   text DEFAULT pg_catalog.current_setting('search_path')
) RETURNS TABLE (job_id bigint, status text, project_id bigint, model_id bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    v_rel oid;
    v_error text;
    v_copied bigint;
    v_table text;
    v_msg    text;
    v_detail text;
    v_hint   text;
    v_code   text;
BEGIN
    IF relation_name IS NOT NULL THEN
        BEGIN  -- the name resolves as the caller resolves it: its search_path, its schema privileges
            PERFORM pg_catalog.set_config('search_path', coalesce(caller_search_path, '"$user", public'), true);
            v_rel := pg_catalog.to_regclass(relation_name);
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            v_error := SQLERRM;
        END;
    END IF;
    SELECT * INTO s FROM pgml._submit(tune.project_name, tune.task, tune.relation_name, tune.y_column_name,
                                      tune.model_name, tune.hyperparams, tune.test_size, tune.test_sampling,
                                      tune.automatic_deploy, tune.materialize_snapshot, tune.max_attempts,
                                      tune.priority, tune.caller_search_path, v_rel, v_error);
    IF s.relation IS NOT NULL THEN
        v_table := pgml._job_table_begin(s.job_id);
        -- the caller's view runs as the caller, with the caller's search_path (its functions may rely on it)
        PERFORM pg_catalog.set_config('search_path', coalesce(caller_search_path, '"$user", public'), true);
        EXECUTE pg_catalog.format('INSERT INTO %s SELECT %s FROM %s', v_table,
                                  (SELECT pg_catalog.string_agg(pg_catalog.format('%I::text', c), ', ' ORDER BY i)
                                   FROM pg_catalog.unnest(s.columns) WITH ORDINALITY AS x (c, i)),
                                  s.relation);
        GET DIAGNOSTICS v_copied = ROW_COUNT;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    PERFORM pgml._submitted(s.job_id, v_copied);
    RETURN QUERY SELECT s.job_id, 'queued'::text, s.project_id, s.model_id;
EXCEPTION WHEN OTHERS THEN
    -- as in 0021: raised again here, where the caller's statement is, so psql shows the message, its HINT and one
    -- CONTEXT line; an error without a HINT (an unexpected one) keeps its whole context
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' THEN
        RAISE;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._job_table_begin(bigint), pgml._job_tables_drop(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._job_table_begin(bigint) TO pgml_user;
REVOKE ALL ON FUNCTION pgml._child_rows(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._child_rows(bigint, text) TO pgml_child;
REVOKE ALL ON FUNCTION pgml._submitted(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._submitted(bigint, bigint) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                                    integer, integer, text) TO pgml_user;

INSERT INTO pgml.schema_migrations (version) VALUES ('0024_job_tables') ON CONFLICT DO NOTHING;
