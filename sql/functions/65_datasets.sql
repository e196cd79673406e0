-- pgml.load_dataset(): the job that loads a dataset into a table, its staging tables and checks.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- The kwargs a load may pass on to datasets.load_dataset (the worker checks them again: recipes/load_dataset.py
-- KWARGS, and tests/integration/test_registry.py that both agree). Nothing that reaches outside the job:
-- no cache_dir, trust_remote_code, storage_options, download_config, num_proc, keep_in_memory.
CREATE OR REPLACE FUNCTION pgml._dataset_kwargs() RETURNS text[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY['split', 'revision', 'data_files', 'data_dir', 'token',
                 -- the csv / json / text builders' options
                 'sep', 'delimiter', 'quotechar', 'header', 'column_names', 'skiprows', 'encoding', 'field',
                 'columns']
$$;

-- The staging table of one attempt of a load job, in schema pgml_staging (0034: only pgml_owner creates names
-- there, nobody else may use it), as pgml._dataset_begin named it: load_<job>_<attempt>_<16 random hex digits>, a
-- name nobody can know before it exists. NULL when the attempt has none.
CREATE OR REPLACE FUNCTION pgml._dataset_staging(job_id bigint, attempt integer) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.relname::text FROM pg_catalog.pg_class c
    WHERE c.relnamespace = 'pgml_staging'::regnamespace AND c.relkind = 'r'
      AND c.relname ~ pg_catalog.format('^load_%s_%s_[0-9a-f]{16}$', job_id, attempt)
    ORDER BY c.oid DESC LIMIT 1
$$;

-- Moves a load's staging table in as pgml.<name> (no relation of that name exists now): renamed when nobody holds a
-- lock on it, at once; otherwise its rows are copied into a new table and the staging table is left to the sweep
-- (pgml._job_tables_sweep). Any login can hold a lock on a table it sees in pg_class (pg_relation_size(oid) in an
-- open transaction): the load must not wait for it.
CREATE OR REPLACE FUNCTION pgml._dataset_move_in(staging text, name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_timeout text := pg_catalog.current_setting('lock_timeout');
BEGIN
    BEGIN
        PERFORM pg_catalog.set_config('lock_timeout', '10ms', true);  -- what the move also locks (its TOAST table)
        EXECUTE format('LOCK TABLE pgml_staging.%I IN ACCESS EXCLUSIVE MODE NOWAIT', staging);
        EXECUTE format('ALTER TABLE pgml_staging.%I RENAME TO %I', staging, name);
        EXECUTE format('ALTER TABLE pgml_staging.%I SET SCHEMA pgml', name);
        PERFORM pg_catalog.set_config('lock_timeout', v_timeout, true);
        RETURN;
    EXCEPTION WHEN lock_not_available THEN
        NULL;  -- (the subtransaction's lock_timeout is undone with it)
    END;
    EXECUTE format('CREATE TABLE pgml.%I (LIKE pgml_staging.%I)', name, staging);
    EXECUTE format('INSERT INTO pgml.%I SELECT * FROM pgml_staging.%I', name, staging);
    PERFORM pgml._drop_unlocked('pgml_staging', staging);
END $$;

-- The job's row if `attempt` owns it now (the worker's fence), locked against a concurrent settle.
CREATE OR REPLACE FUNCTION pgml._dataset_job(job_id bigint, ticket text) RETURNS pgml.jobs
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job pgml.jobs := pgml._child_job(_dataset_job.job_id, ticket, true);  -- the child's ticket (0010)
BEGIN
    IF v_job.task <> 'load_dataset' THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = format('job %s is a %s job, not a load_dataset job', v_job.id, v_job.task);
    END IF;
    RETURN v_job;
END $$;

-- Drops the staging tables of a job's attempts (all of them, or all but `keep`), each only if nobody holds a lock
-- on it at once (pgml._drop_unlocked): a table in use is left to the sweep (pgml._job_tables_sweep), never waited for
-- by the caller (a settle, a claim, a cancel).
CREATE OR REPLACE FUNCTION pgml._dataset_drop_staging(job_id bigint, keep text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT n.nspname::text AS nsp, c.relname::text AS relname FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r'
               AND ((n.nspname = 'pgml_staging' AND c.relname ~ format('^load_%s_[0-9]+_[0-9a-f]{16}$', job_id))
                    OR (n.nspname = 'pgml' AND c.relname ~ format('^_dataset_load_%s_[0-9]+$', job_id)))
               AND c.relname IS DISTINCT FROM keep LOOP
        PERFORM pgml._drop_unlocked(r.nsp, r.relname);
    END LOOP;
END $$;

-- A load job that ends without its commit (failed, cancelled, requeued, reaped) leaves no half table.
CREATE OR REPLACE FUNCTION pgml._dataset_job_ended() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._dataset_drop_staging(NEW.id);
    RETURN NULL;
END $$;

-- Only pgml.load_dataset_async() queues load jobs (pgml.tune(task => 'load_dataset', ...) would skip its checks).
CREATE OR REPLACE FUNCTION pgml._dataset_job_inserted() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = 'load_dataset jobs are queued by pgml.load_dataset(), not pgml.tune()',
        HINT = 'SELECT pgml.load_dataset(''imdb''), or pgml.load_dataset_async(...) to get the job id at once';
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

-- pgml._dataset_check_path: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._dataset_check_path(what text, path text, absolute_ok boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF path IS NULL OR btrim(path) = '' THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is empty', what),
            HINT = 'name a file, e.g. ''reviews.csv''',
            ERRCODE = 'invalid_parameter_value';
    ELSIF path ~ '^[A-Za-z][A-Za-z0-9+.-]*://' THEN
        RAISE EXCEPTION USING MESSAGE = format('%s %L is a URL', what, path),
            HINT = 'load_dataset reads Hugging Face datasets by name and files in the workers'' datasets directory',
            ERRCODE = 'invalid_parameter_value';
    ELSIF path ~ '(^|/)\.\.(/|$)' OR path ~ '^~' OR path ~ '[\x01-\x1f]' THEN
        RAISE EXCEPTION USING MESSAGE = format('%s %L leaves its directory ("..", "~" or a control character)', what, path),
            HINT = 'name a file below the workers'' datasets directory, e.g. ''sub/reviews.csv''',
            ERRCODE = 'insufficient_privilege';
    ELSIF path ~ '^/' AND NOT absolute_ok THEN
        RAISE EXCEPTION USING MESSAGE = format('%s %L is an absolute path', what, path),
            HINT = 'name a path inside the dataset repository, e.g. ''data/train-*.parquet''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- pgml._dataset_check_target: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._dataset_check_target(name text, who name) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rel    oid := to_regclass(format('pgml.%I', name));
    v_owner  oid;
    v_kind   "char";
    v_loader name;
BEGIN
    IF v_rel IS NULL THEN
        RETURN;
    END IF;
    SELECT c.relowner, c.relkind INTO v_owner, v_kind FROM pg_class c WHERE c.oid = v_rel;
    SELECT d.loaded_by INTO v_loader FROM pgml.datasets d WHERE d.name = _dataset_check_target.name;
    IF NOT FOUND OR v_kind <> 'r' OR v_owner <> 'pgml_owner'::regrole THEN
        RAISE EXCEPTION USING MESSAGE = format('pgml.%I exists and was not created by pgml.load_dataset', name),
            HINT = 'choose another name (a local file''s name is the table''s), or drop that relation first',
            ERRCODE = 'duplicate_table';
    END IF;
    IF v_loader <> who AND NOT pg_has_role(who, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING MESSAGE = format('pgml.%I was loaded by %s; only they or an administrator may reload it', name,
                                  v_loader),
            HINT = 'ask them to GRANT SELECT on it to you, or an administrator (pgml_admin) to reload it',
            ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

-- pgml.load_dataset_async: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml.load_dataset_async(
    source  text,
    subset  text DEFAULT NULL,
    "limit" integer DEFAULT NULL,
    kwargs  jsonb DEFAULT '{}'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kwargs jsonb := coalesce(kwargs, '{}');
    v_key    text;
    v_value  jsonb;
    v_local  boolean;
    v_hp      jsonb;
    v_clean   jsonb;
    v_secrets jsonb;
    v_sealed  text;
    v_project pgml.projects;
    v_model   bigint;
    v_job     bigint;
    v_file   text;
    v_who    name := pgml._submitter();  -- session_user, or through the loopback the user who called load_dataset
    v_msg    text;
    v_detail text;
    v_hint   text;
    v_code   text;
BEGIN
    IF source IS NULL OR btrim(source) = '' THEN
        RAISE EXCEPTION USING MESSAGE = 'source is required',
            HINT = 'name a Hugging Face dataset (''imdb'') or a file in the workers'' datasets directory (''reviews.csv'')',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(source) > 63 THEN
        RAISE EXCEPTION USING MESSAGE = format('source %L is %s bytes: the table pgml."<source>" allows at most 63', source,
                                  octet_length(source)),
            HINT = 'load it under a shorter name: a local file can be renamed; a hub dataset cannot, yet',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF source ~ '[\x01-\x1f]' OR source LIKE '\_dataset\_load\_%' THEN
        RAISE EXCEPTION USING MESSAGE = format('source %L is not a usable name', source),
            HINT = 'control characters and the prefix _dataset_load_ are reserved',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    v_local := source ~* '\.(csv|json|jsonl|parquet)$' OR source ~ '^\.?/';
    IF v_local THEN
        PERFORM pgml._dataset_check_path('source', source, true);
    ELSIF source !~ '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$' OR source ~ '\.\.|--' THEN
        RAISE EXCEPTION USING MESSAGE = format('source %L is neither a Hugging Face dataset name nor a data file', source),
            HINT = 'use a hub name (''imdb'', ''FinGPT/fingpt-sentiment-train'') or a file name ending in .csv, .json, '
            '.jsonl or .parquet (in the workers'' datasets directory)',
            ERRCODE = 'invalid_parameter_value';
    ELSIF source IN ('pandas', 'sql', 'arrow', 'cache', 'webdataset', 'imagefolder', 'audiofolder', 'videofolder',
                     'pdffolder', 'niftifolder', 'xml', 'hdf5', 'eval', 'lance', 'spark', 'generator') THEN
        RAISE EXCEPTION USING MESSAGE = format('source %L: the %s builder is not allowed', source, source),
            HINT = 'load csv, json, jsonl or parquet files (source => ''csv'' with kwargs data_files, or the file name)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF subset IS NOT NULL AND (btrim(subset) = '' OR length(subset) > 200 OR subset ~ '[\x01-\x1f/]') THEN
        RAISE EXCEPTION USING MESSAGE = format('subset %L is not a configuration name', subset),
            HINT = 'pass the dataset''s configuration (e.g. ''plain_text''), or NULL for its default',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF "limit" IS NOT NULL AND "limit" < 1 THEN
        RAISE EXCEPTION USING MESSAGE = format('limit %s: at least 1 row', "limit"),
            HINT = 'pass NULL to load every row',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(v_kwargs) <> 'object' THEN
        RAISE EXCEPTION USING MESSAGE = format('kwargs must be a JSON object, got a JSON %s', jsonb_typeof(v_kwargs)),
            HINT = 'e.g. kwargs => ''{"split": "train"}''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_key, v_value IN SELECT key, value FROM jsonb_each(v_kwargs) LOOP
        IF v_key <> ALL (pgml._dataset_kwargs()) THEN
            RAISE EXCEPTION USING MESSAGE = format('kwargs key %L is not allowed', v_key),
                HINT = format('load_dataset passes on only: %s%s', array_to_string(pgml._dataset_kwargs(), ', '),
                       CASE WHEN v_key IN ('cache_dir', 'trust_remote_code', 'storage_options', 'download_config',
                                           'download_mode', 'num_proc', 'keep_in_memory', 'streaming')
                            THEN format(' (%s is the workers'' business)', v_key) ELSE '' END),
                ERRCODE = 'insufficient_privilege';
        END IF;
        IF v_key IN ('data_files', 'data_dir') THEN
            FOR v_file IN SELECT p #>> '{}' FROM jsonb_path_query(v_value, 'strict $.**') AS p
                          WHERE jsonb_typeof(p) = 'string' LOOP
                -- a hub dataset's data_files are paths in its repository; a builder's are files on the workers
                PERFORM pgml._dataset_check_path(format('kwargs.%s', v_key), v_file,
                                                 v_local OR source IN ('csv', 'json', 'parquet', 'text'));
            END LOOP;
            IF jsonb_typeof(v_value) NOT IN ('string', 'array', 'object') THEN
                RAISE EXCEPTION USING MESSAGE = format('kwargs.%s must be a path, a list of paths or {split: paths}', v_key),
                    HINT = 'e.g. "data_files": {"train": "train.csv", "test": "test.csv"}',
                    ERRCODE = 'invalid_parameter_value';
            END IF;
        ELSIF v_key IN ('split', 'revision', 'token') AND jsonb_typeof(v_value) <> 'string' THEN
            RAISE EXCEPTION USING MESSAGE = format('kwargs.%s must be a string', v_key),
                HINT = 'e.g. "split": "train"',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF source IN ('csv', 'json', 'parquet', 'text') AND NOT v_kwargs ? 'data_files' AND NOT v_kwargs ? 'data_dir' THEN
        RAISE EXCEPTION USING MESSAGE = format('source %L needs kwargs.data_files', source),
            HINT = format('e.g. pgml.load_dataset(''%s'', kwargs => ''{"data_files": "reviews.%s"}'')', source, source),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgml._dataset_check_target(source, v_who);

    -- queued as pgml._submit() queues a job (pgml._submit itself wants a relation for every task but noop):
    -- project, model and job rows as the session's login, the token sealed, then pgml._submitted()'s limits
    v_hp := jsonb_strip_nulls(jsonb_build_object('source', source, 'subset', subset, 'limit', "limit",
                                                 'kwargs', v_kwargs - 'token', 'token', v_kwargs -> 'token'));
    SELECT s.clean, s.secrets INTO v_clean, v_secrets FROM pgml._split_secrets(v_hp) s;
    v_job := nextval(pg_get_serial_sequence('pgml.jobs', 'id'));  -- the sealed token is bound to this job
    IF v_secrets <> '{}' THEN
        v_sealed := pgml._seal(v_secrets, v_job, v_who);
    END IF;
    INSERT INTO pgml.projects AS p (name, task, owner) VALUES ('pgml.load_dataset', 'load_dataset', v_who)
    ON CONFLICT (owner, name) DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;
    IF v_project.task <> 'load_dataset' THEN
        RAISE EXCEPTION USING MESSAGE = format('your project %L is a %s project', v_project.name, v_project.task),
            HINT = 'load_dataset keeps its jobs in a project of that name: rename yours',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pgml.models (project_id, task, model_name, hyperparams, owner)
    VALUES (v_project.id, 'load_dataset', source, v_clean, v_who)
    RETURNING id INTO v_model;
    INSERT INTO pgml.jobs (id, project_id, model_id, task, model_name, test_size, test_sampling, hyperparams,
                           secrets, priority, max_attempts, status, submitted_by)
    VALUES (v_job, v_project.id, v_model, 'load_dataset', source, 0.25, 'last', v_clean, v_sealed, 0, 3,
            'submitting', v_who);
    PERFORM pgml._submitted(v_job);
    IF v_who = session_user THEN  -- not for pgml.load_dataset, which waits for it through the loopback
        PERFORM pgml._job_queued_notice(v_job);
    END IF;
    RETURN v_job;
EXCEPTION WHEN OTHERS THEN
    -- raised again here, where the caller's statement is: psql shows the message, its HINT and this one CONTEXT
    -- line, not the internal calls that found the problem. An error without a HINT (an unexpected one) keeps
    -- its whole context.
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' THEN
        RAISE;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $$;

COMMENT ON FUNCTION pgml.load_dataset_async(text, text, integer, jsonb) IS
    'Queue loading a Hugging Face dataset (or a file in the workers'' datasets directory) into pgml."<source>". '
    'Returns the job id at once; CALL pgml.wait(id) follows it, pgml._dataset_result(id) returns (table_name, rows).';

-- pgml._dataset_result: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._dataset_result(job_id bigint) RETURNS TABLE (table_name text, rows bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job record;
BEGIN
    SELECT j.status, j.task, j.error, j.metrics INTO v_job FROM pgml.jobs j WHERE j.id = _dataset_result.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', job_id), ERRCODE = 'no_data_found',
            HINT = 'pgml.load_dataset_async() returns the job id; SELECT id, status FROM pgml.jobs lists your jobs';
    END IF;
    IF v_job.task <> 'load_dataset' THEN
        RAISE EXCEPTION USING MESSAGE = format('job %s is a %s job, not a load_dataset job', job_id, v_job.task),
            HINT = 'pass the id pgml.load_dataset_async() returned',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_job.status IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION USING MESSAGE = format('load_dataset job %s %s: %s', job_id, v_job.status, v_job.error),
            ERRCODE = CASE v_job.status WHEN 'cancelled' THEN 'query_canceled' ELSE 'external_routine_exception' END,
            HINT = format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', job_id);
    END IF;
    IF v_job.status = 'succeeded' THEN
        RETURN QUERY SELECT v_job.metrics ->> 'table_name', (v_job.metrics ->> 'rows')::bigint;
    END IF;
END $$;

-- pgml._dataset_begin: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._dataset_begin(job_id bigint, ticket text, names text[], types text[])
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job     pgml.jobs := pgml._dataset_job(job_id, ticket);
    v_staging text := pg_catalog.format('load_%s_%s_%s', job_id, v_job.attempt,
                                        pg_catalog.left(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 16));
    v_cols    text;
BEGIN
    PERFORM pgml._dataset_check_target(v_job.hyperparams ->> 'source', v_job.submitted_by::name);
    IF coalesce(cardinality(names), 0) = 0 OR cardinality(names) <> cardinality(types) OR cardinality(names) > 1600
    THEN
        RAISE EXCEPTION USING MESSAGE = 'a dataset needs between 1 and 1600 columns, each with a type',
            HINT = 'a worker bug',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(names) n WHERE n IS NULL OR n = '' OR octet_length(n) > 63 OR n ~ '[\x01-\x1f]')
    THEN
        RAISE EXCEPTION USING MESSAGE = format('the dataset''s column names %s are not all usable (1 to 63 bytes, no control '
                                  'characters)', names),
            HINT = 'rename the columns in the source data',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(DISTINCT n) FROM unnest(names) n) <> cardinality(names) THEN
        RAISE EXCEPTION USING MESSAGE = format('the dataset has duplicate column names: %s', names),
            HINT = 'rename them in the source',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(types) t WHERE t IS NULL OR t NOT IN ('text', 'smallint', 'integer', 'bigint',
               'numeric', 'real', 'double precision', 'boolean', 'bytea', 'date', 'timestamp', 'timestamptz', 'time',
               'jsonb')) THEN
        RAISE EXCEPTION USING MESSAGE = format('unsupported column types %s', types),
            HINT = 'a worker bug',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- this job's earlier attempts (what other jobs left is the sweep's: pgml._job_tables_sweep)
    PERFORM pgml._dataset_drop_staging(job_id);
    SELECT string_agg(format('%I %s', n, t), ', ' ORDER BY i) INTO v_cols
    FROM unnest(names, types) WITH ORDINALITY AS c (n, t, i);
    EXECUTE format('CREATE TABLE pgml_staging.%I (%s)', v_staging, v_cols);
    EXECUTE format('REVOKE ALL ON pgml_staging.%I FROM PUBLIC', v_staging);
    EXECUTE format('GRANT INSERT ON pgml_staging.%I TO %I', v_staging, session_user);
    RETURN format('pgml_staging.%I', v_staging);
END $$;

-- pgml._dataset_commit: as in 0012, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._dataset_commit(job_id bigint, ticket text, rows bigint) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job      pgml.jobs := pgml._dataset_job(job_id, ticket);
    v_name     text := v_job.hyperparams ->> 'source';
    v_staging  text := pgml._dataset_staging(job_id, v_job.attempt);
    v_target   oid;
    v_count    bigint;
    v_columns  jsonb;
    v_old_cols jsonb;
    v_deps     text;
    v_previous name;
BEGIN
    IF v_staging IS NULL THEN
        RAISE EXCEPTION USING MESSAGE = format('job %s attempt %s has no staging table', job_id, v_job.attempt),
            HINT = 'a worker bug',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('REVOKE ALL ON pgml_staging.%I FROM %I', v_staging, session_user);
    EXECUTE format('SELECT count(*) FROM pgml_staging.%I', v_staging) INTO v_count;
    IF v_count <> rows THEN
        RAISE EXCEPTION USING MESSAGE = format('the worker wrote %s rows but the staging table holds %s', rows, v_count),
            HINT = 'a worker bug',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT jsonb_agg(jsonb_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod))
                     ORDER BY a.attnum) INTO v_columns
    FROM pg_attribute a WHERE a.attrelid = format('pgml_staging.%I', v_staging)::regclass AND a.attnum > 0
                          AND NOT a.attisdropped;

    PERFORM pgml._dataset_check_target(v_name, v_job.submitted_by::name);
    v_target := to_regclass(format('pgml.%I', v_name));
    IF v_target IS NOT NULL THEN
        EXECUTE format('LOCK TABLE pgml.%I IN ACCESS EXCLUSIVE MODE', v_name);
        SELECT d.loaded_by, d.columns INTO v_previous, v_old_cols FROM pgml.datasets d WHERE d.name = v_name;
        SELECT string_agg(DISTINCT coalesce(CASE v.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END
                                            || v.oid::regclass::text,
                                            pg_describe_object(d.classid, d.objid, d.objsubid)), ', ') INTO v_deps
        FROM pg_depend d
        LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
        LEFT JOIN pg_class v ON v.oid = r.ev_class
        WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = v_target AND d.deptype = 'n'
          AND r.ev_class IS DISTINCT FROM v_target;
        IF v_previous IS DISTINCT FROM v_job.submitted_by::name THEN
            EXECUTE format('REVOKE ALL ON pgml.%I FROM %I', v_name, v_previous);
        END IF;
        IF v_deps IS NULL THEN
            EXECUTE format('DROP TABLE pgml.%I', v_name);
            PERFORM pgml._dataset_move_in(v_staging, v_name);
        ELSIF v_old_cols = v_columns THEN
            EXECUTE format('TRUNCATE pgml.%I', v_name);
            EXECUTE format('INSERT INTO pgml.%I SELECT * FROM pgml_staging.%I', v_name, v_staging);
            PERFORM pgml._drop_unlocked('pgml_staging', v_staging);
        ELSE
            RAISE EXCEPTION USING MESSAGE = format('pgml.%I has dependent objects (%s) and the new load''s columns %s differ from '
                                      'its columns %s', v_name, v_deps, v_columns, v_old_cols),
                HINT = 'drop those objects first (they are recreated over the new table), or load under another name',
                ERRCODE = 'dependent_objects_still_exist';
        END IF;
    ELSE
        PERFORM pgml._dataset_move_in(v_staging, v_name);
    END IF;
    EXECUTE format('GRANT SELECT ON pgml.%I TO %I', v_name, v_job.submitted_by);

    INSERT INTO pgml.datasets AS d (name, source, subset, loaded_by, job_id, rows, columns, loaded_at)
    VALUES (v_name, v_name, v_job.hyperparams ->> 'subset', v_job.submitted_by, job_id, rows, v_columns,
            clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET source = EXCLUDED.source, subset = EXCLUDED.subset,
        loaded_by = EXCLUDED.loaded_by, job_id = EXCLUDED.job_id, rows = EXCLUDED.rows, columns = EXCLUDED.columns,
        loaded_at = EXCLUDED.loaded_at;
    RETURN jsonb_build_object('table_name', format('pgml.%I', v_name), 'rows', rows, 'columns', v_columns);
END $$;

CREATE OR REPLACE TRIGGER jobs_dataset_ended AFTER UPDATE OF status ON pgml.jobs
    FOR EACH ROW WHEN (NEW.task = 'load_dataset' AND OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION pgml._dataset_job_ended();

CREATE OR REPLACE TRIGGER jobs_dataset_inserted BEFORE INSERT ON pgml.jobs
    FOR EACH ROW WHEN (NEW.task = 'load_dataset' AND NEW.relation_name IS NOT NULL)
    EXECUTE FUNCTION pgml._dataset_job_inserted();
