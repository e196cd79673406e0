-- 0017_row_columns: the rows a job copies at submit time go into columns of their own (c1 .. c8, text) instead of one
-- text[] per row. Building an array per row made pgml.tune's copy of 25,000 IMDB-sized rows take 2.5x as long as a
-- plain INSERT ... SELECT of them (bench/submit.py: the array shape 239 ms, columns 121 ms, plain 122 ms); the
-- reader (pgml._child_rows) builds the arrays instead, once per job, where nobody waits on it.

ALTER TABLE pgml.job_rows ADD COLUMN IF NOT EXISTS c1 text, ADD COLUMN IF NOT EXISTS c2 text,
    ADD COLUMN IF NOT EXISTS c3 text, ADD COLUMN IF NOT EXISTS c4 text, ADD COLUMN IF NOT EXISTS c5 text,
    ADD COLUMN IF NOT EXISTS c6 text, ADD COLUMN IF NOT EXISTS c7 text, ADD COLUMN IF NOT EXISTS c8 text;
-- A BRIN index instead of a btree on job_id: a job's rows go in by one statement, so they lie together, and a BRIN
-- costs next to nothing to keep up per row (the btree was a third of the copy's time: 185 vs 156 ms for 25,000 rows,
-- 112 without any index). Rows of pages not yet summarized are always read, which only widens a read, never misses.
DROP INDEX IF EXISTS pgml.job_rows_job_idx;
CREATE INDEX IF NOT EXISTS job_rows_job_brin ON pgml.job_rows USING brin (job_id)
    WITH (pages_per_range = 16, autosummarize = on);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'pgml.job_rows'::regclass AND attname = 'v'
               AND NOT attisdropped) THEN
        UPDATE pgml.job_rows SET c1 = v[1], c2 = v[2], c3 = v[3], c4 = v[4], c5 = v[5], c6 = v[6], c7 = v[7], c8 = v[8];
        ALTER TABLE pgml.job_rows DROP COLUMN v;
    END IF;
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
BEGIN
    IF relation_name IS NOT NULL THEN
        BEGIN  -- the name resolves as the caller resolves it: its search_path, its schema privileges
            PERFORM set_config('search_path', coalesce(caller_search_path, '"$user", public'), true);
            v_rel := pg_catalog.to_regclass(relation_name);
            PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            v_error := SQLERRM;
        END;
    END IF;
    SELECT * INTO s FROM pgml._submit(tune.project_name, tune.task, tune.relation_name, tune.y_column_name,
                                      tune.model_name, tune.hyperparams, tune.test_size, tune.test_sampling,
                                      tune.automatic_deploy, tune.materialize_snapshot, tune.max_attempts,
                                      tune.priority, tune.caller_search_path, v_rel, v_error);
    IF s.relation IS NOT NULL THEN
        -- the caller's view runs as the caller, with the caller's search_path (its functions may rely on it)
        PERFORM set_config('search_path', coalesce(caller_search_path, '"$user", public'), true);
        IF cardinality(s.columns) > 8 THEN
            RAISE EXCEPTION 'a job copies at most 8 columns, not %', cardinality(s.columns)
                USING ERRCODE = 'program_limit_exceeded';
        END IF;
        EXECUTE format('INSERT INTO pgml.job_rows (job_id, n, %s) '
                       'SELECT $1, pg_catalog.row_number() OVER (), %s FROM %s',
                       (SELECT string_agg(format('c%s', i), ', ' ORDER BY i)
                        FROM generate_series(1, cardinality(s.columns)) AS i),
                       (SELECT string_agg(format('%I::text', c), ', ' ORDER BY i)
                        FROM unnest(s.columns) WITH ORDINALITY AS x (c, i)),
                       s.relation)
        USING s.job_id;
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    PERFORM pgml._submitted(s.job_id);
    RETURN QUERY SELECT s.job_id, 'queued'::text, s.project_id, s.model_id;
END $$;

-- The rows pgml.tune() copied for this job, in their order, as arrays (jobs.snapshot_columns names them).
CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_rows.job_id, ticket);
    k integer := coalesce(cardinality(v.snapshot_columns), 8);
BEGIN
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._child_rows(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._child_rows(bigint, text) TO pgml_child;
GRANT EXECUTE ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                                    integer, integer, text) TO pgml_user;

INSERT INTO pgml.schema_migrations (version) VALUES ('0017_row_columns') ON CONFLICT DO NOTHING;
