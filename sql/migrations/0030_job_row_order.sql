-- A job reads its rows in the order pgml.tune() copied them: test_sampling 'last' takes the test rows from the end of
-- that order, and every rank of a job must see the same split. 0024 relied on the job table's physical order being
-- the order its one INSERT ... SELECT wrote, which does not hold: once a page is full, the free space map can hand a
-- later, shorter row a place on an earlier page (55 of 12,000 reviews landed out of order on PostgreSQL 15 here;
-- a scan PostgreSQL plans in parallel for a large table returns rows in whatever order its workers produce). The
-- job table now numbers its rows (n, an identity column after c1..ck, filled by the INSERT in the order its SELECT
-- produced them) and the child reads ORDER BY n. Both functions start from their last definitions (0024, 0027).

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
    -- written once, read once or twice, then dropped: autovacuum has nothing to do on it. The last column, n,
    -- numbers the rows in the order the submitting INSERT ... SELECT produced them (it fills c1..ck only)
    EXECUTE pg_catalog.format(
        'CREATE TABLE pgml_rows.%I (%s, n bigint GENERATED ALWAYS AS IDENTITY) '
        'WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)',
        v_name, (SELECT pg_catalog.string_agg(pg_catalog.format('c%s text', i), ', ' ORDER BY i)
                 FROM pg_catalog.generate_series(1, pg_catalog.cardinality(v_cols)) AS i));
    EXECUTE pg_catalog.format('GRANT INSERT, SELECT ON pgml_rows.%I TO %I', v_name, v_who);
    EXECUTE pg_catalog.format('GRANT SELECT ON pgml_rows.%I TO pgml_admin', v_name);
    RETURN pg_catalog.format('pgml_rows.%I', v_name);
END $$;

CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET synchronize_seqscans = off
AS $$
DECLARE
    v pgml.jobs := pgml._child_reader(_child_rows.job_id, ticket);
    k integer := coalesce(pg_catalog.cardinality(v.snapshot_columns), 8);
    v_name text := pgml._job_table(_child_rows.job_id);
    v_table regclass;
BEGIN
    v_table := pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', v_name));
    IF v_table IS NOT NULL THEN
        RETURN QUERY EXECUTE pg_catalog.format(
            'SELECT ARRAY[%s] FROM %s%s',
            (SELECT pg_catalog.string_agg(pg_catalog.format('c%s', i), ', ' ORDER BY i)
             FROM pg_catalog.generate_series(1, k) AS i), v_table,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = v_table AND a.attname = 'n' AND NOT a.attisdropped)
                 THEN ' ORDER BY n' ELSE '' END);  -- tables of jobs submitted before 0030 have no n
        RETURN;
    END IF;
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0030_job_row_order') ON CONFLICT DO NOTHING;
