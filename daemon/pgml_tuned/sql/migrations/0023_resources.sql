-- 0023_resources: hyperparams.resources asks for more than one process for a training job: {"gpus": N} runs N
-- ranks, one per GPU (torch.distributed, NCCL), {"procs": N} N ranks on CPUs (gloo); "nodes" (several hosts in one
-- gang) is not supported yet and refused. The worker starts the ranks (pgml_tuned/child/dist.py); rank 0 alone writes
-- the job's logs, checkpoints, files and final commit. pgml.tune checks the object before anything is queued.

UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources']
WHERE name IN ('text-classification', 'text-pair-classification', 'conversation')
  AND NOT ('resources' = ANY (hyperparams));

-- the diagnostic task runs as several ranks too, and can make one of them crash (recipes/noop.py)
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources', 'fail_rank']
WHERE name = 'noop' AND NOT ('fail_rank' = ANY (hyperparams));

-- Raises (with a HINT naming the fix) unless hyperparams.resources is absent or a valid resources object.
CREATE OR REPLACE FUNCTION pgml._check_resources(hyperparams jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
    k text;
    v jsonb;
    n numeric;
    caps constant jsonb := '{"gpus": 64, "procs": 64, "nodes": 1}';
    example constant text := 'e.g. "resources": {"gpus": 4} (one rank per GPU) or {"procs": 2} (CPU ranks)';
BEGIN
    IF hyperparams IS NULL OR pg_catalog.jsonb_typeof(hyperparams) <> 'object' OR NOT hyperparams ? 'resources' THEN
        RETURN;  -- pgml._submit names a hyperparams that is not an object
    END IF;
    r := hyperparams -> 'resources';
    IF pg_catalog.jsonb_typeof(r) <> 'object' THEN
        PERFORM pgml._fail(pg_catalog.format('hyperparams.resources must be a JSON object, got a JSON %s',
                                             pg_catalog.jsonb_typeof(r)), example);
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(r) AS e LOOP
        IF NOT caps ? k THEN
            PERFORM pgml._fail(pg_catalog.format('unknown key hyperparams.resources.%s', k),
                               'the keys of hyperparams.resources are gpus, procs and nodes; ' || example);
        END IF;
        IF pg_catalog.jsonb_typeof(v) <> 'number' THEN
            PERFORM pgml._fail(pg_catalog.format('hyperparams.resources.%s must be a positive whole number, got a JSON %s',
                                                 k, pg_catalog.jsonb_typeof(v)), example);
        END IF;
        n := (v #>> '{}')::numeric;
        IF n <> pg_catalog.trunc(n) OR n < 1 THEN
            PERFORM pgml._fail(pg_catalog.format('hyperparams.resources.%s must be a positive whole number, not %s',
                                                 k, v), example);
        END IF;
        IF k = 'nodes' AND n > 1 THEN
            PERFORM pgml._fail(pg_catalog.format('hyperparams.resources.nodes = %s: training across several hosts '
                                                 'is not supported yet', v),
                               'run the job on one host: leave "nodes" out (or 1) and ask for up to 64 GPUs of one '
                               'worker with "gpus"');
        END IF;
        IF n > (caps ->> k)::numeric THEN
            PERFORM pgml._fail(pg_catalog.format('hyperparams.resources.%s = %s is more than the most a job may ask '
                                                 'for (%s)', k, v, caps ->> k), example);
        END IF;
    END LOOP;
    IF r ? 'gpus' AND r ? 'procs' THEN
        PERFORM pgml._fail('hyperparams.resources gives both gpus and procs',
                           'give "gpus" (one rank per GPU) or "procs" (ranks on CPUs), not both');
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
    PERFORM pgml._check_resources(tune.hyperparams);
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

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._check_resources(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._check_resources(jsonb) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                                    integer, integer, text) TO pgml_user;

INSERT INTO pgml.schema_migrations (version) VALUES ('0023_resources') ON CONFLICT DO NOTHING;
