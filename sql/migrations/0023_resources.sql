-- 0023_resources: hyperparams.resources asks for more than one process for a training job: {"gpus": N} runs N
-- ranks, one per GPU (torch.distributed, NCCL), {"procs": N} N ranks on CPUs (gloo); "nodes" (several hosts in one
-- gang) is not supported yet and refused. The worker starts the ranks (pgml_tuned/child/dist.py); rank 0 alone writes
-- the job's logs, checkpoints, files and final commit. The object is checked before anything is queued (0022's jobs
-- trigger, through pgml._check_resources).

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
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources must be a JSON object, got a JSON %s',
                                             pg_catalog.jsonb_typeof(r)), HINT = example;
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(r) AS e LOOP
        IF NOT caps ? k THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('unknown key hyperparams.resources.%s', k), HINT = 'the keys of hyperparams.resources are gpus, procs and nodes; ' || example;
        END IF;
        IF pg_catalog.jsonb_typeof(v) <> 'number' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s must be a positive whole number, got a JSON %s',
                                                 k, pg_catalog.jsonb_typeof(v)), HINT = example;
        END IF;
        n := (v #>> '{}')::numeric;
        IF n <> pg_catalog.trunc(n) OR n < 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s must be a positive whole number, not %s',
                                                 k, v), HINT = example;
        END IF;
        IF k = 'nodes' AND n > 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.nodes = %s: training across several hosts '
                                                 'is not supported yet', v), HINT = 'run the job on one host: leave "nodes" out (or 1) and ask for up to 64 GPUs of one '
                               'worker with "gpus"';
        END IF;
        IF n > (caps ->> k)::numeric THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s = %s is more than the most a job may ask '
                                                 'for (%s)', k, v, caps ->> k), HINT = example;
        END IF;
    END LOOP;
    IF r ? 'gpus' AND r ? 'procs' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'hyperparams.resources gives both gpus and procs', HINT = 'give "gpus" (one rank per GPU) or "procs" (ranks on CPUs), not both';
    END IF;
END $$;

-- One check for every way a job is queued: 0022's BEFORE INSERT trigger on pgml.jobs parses resources with
-- pgml._job_resources, which now validates through pgml._check_resources first (what this worker can run: up to 64
-- GPUs or CPU processes of one host, not both).
CREATE OR REPLACE FUNCTION pgml._job_resources(hyperparams jsonb, OUT gpus integer, OUT procs integer,
                                               OUT nodes integer)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb := hyperparams -> 'resources';
BEGIN
    PERFORM pgml._check_resources(hyperparams);
    gpus := coalesce((r ->> 'gpus')::integer, 0);
    procs := coalesce((r ->> 'procs')::integer, 1);
    nodes := coalesce((r ->> 'nodes')::integer, 1);
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._check_resources(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._check_resources(jsonb) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml._job_resources(jsonb) TO pgml_user, pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0023_resources') ON CONFLICT DO NOTHING;
