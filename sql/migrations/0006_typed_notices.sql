-- 0006_typed_notices: NOTIFY payloads become typed JSON, and the names of secret hyperparams live in one place.
-- Plain SQL, idempotent, runnable with psql.
--
-- pgml_jobs    {"type": "job_queued", "id": N}, sent by the jobs trigger whenever a job becomes queued (submitted,
--              requeued after a SIGTERM, or put back by the reaper), so an idle worker wakes at once in every case.
-- pgml_control {"type": "cancel_requested", "id": N}, sent by pgml.cancel() for a running job.
-- A payload only wakes a worker: what it does comes from the rows it reads (cancel_requested, status).

-- The hyperparams keys (at the top level and inside training_args) whose values are secrets: sealed at submit,
-- never stored in clear. Python reads the same list (pgml_tuned.secrets.SECRET_KEYS; a test checks they agree).
CREATE OR REPLACE FUNCTION pgml._secret_keys() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY['token', 'hub_token', 'use_auth_token'] $$;

CREATE OR REPLACE FUNCTION pgml._split_secrets(hyperparams jsonb, OUT clean jsonb, OUT secrets jsonb)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
BEGIN
    clean := hyperparams;
    secrets := '{}';
    FOREACH k IN ARRAY pgml._secret_keys() LOOP
        IF clean ? k THEN
            secrets := secrets || jsonb_build_object(k, clean -> k);
            clean := clean - k;
        END IF;
        IF jsonb_typeof(clean -> 'training_args') = 'object' AND clean -> 'training_args' ? k THEN
            secrets := secrets || jsonb_build_object('training_args.' || k, clean -> 'training_args' -> k);
            clean := jsonb_set(clean, '{training_args}', (clean -> 'training_args') - k);
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgml._job_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.attempt IS DISTINCT FROM OLD.attempt THEN
        INSERT INTO pgml.job_events (job_id, attempt, worker, old_status, new_status, lease_expires_at)
        VALUES (NEW.id, NEW.attempt, NEW.worker, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                NEW.status, NEW.lease_expires_at);
        -- clients LISTEN pgml_job_status to follow jobs without polling
        PERFORM pg_catalog.pg_notify('pgml_job_status', pg_catalog.json_build_object(
            'id', NEW.id, 'status', NEW.status, 'attempt', NEW.attempt)::text);
    END IF;
    -- workers LISTEN pgml_jobs: a job that becomes queued (new, requeued, reaped) wakes one at once
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_catalog.pg_notify('pgml_jobs', pg_catalog.json_build_object('type', 'job_queued', 'id', NEW.id)::text);
    END IF;
    -- the model row follows its job: one place keeps them consistent
    IF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status
       AND NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        UPDATE pgml.models SET status = CASE NEW.status WHEN 'succeeded' THEN 'successful' ELSE NEW.status END,
                               updated_at = pg_catalog.clock_timestamp()
        WHERE id = NEW.model_id;
    END IF;
    RETURN NULL;
END $$;

-- Cancel a job. A queued job is cancelled at once and never starts; for a running one the request is
-- recorded and its worker is woken (NOTIFY pgml_control); the worker reads the request from the job's row,
-- stops the training process and marks the job cancelled within seconds (a dead worker's job is cancelled
-- when its lease expires). Returns the job's status after the call: cancelled, cancelling, or the final
-- status it already had.
CREATE OR REPLACE FUNCTION pgml.cancel(job_id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE pgml.jobs j
    SET cancel_requested = true,
        status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
        error = CASE WHEN j.status = 'queued' THEN 'cancelled by ' || session_user ELSE j.error END,
        finished_at = CASE WHEN j.status = 'queued' THEN clock_timestamp() ELSE j.finished_at END,
        updated_at = clock_timestamp()
    WHERE j.id = cancel.job_id AND j.status IN ('queued', 'running')
    RETURNING j.status INTO v_status;
    IF v_status = 'running' THEN
        PERFORM pg_notify('pgml_control', json_build_object('type', 'cancel_requested', 'id', cancel.job_id)::text);
        RETURN 'cancelling';
    ELSIF v_status IS NOT NULL THEN
        RETURN v_status;
    END IF;
    SELECT j.status INTO v_status FROM pgml.jobs j WHERE j.id = cancel.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', cancel.job_id), ERRCODE = 'no_data_found',
            HINT = 'SELECT id, status FROM pgml.jobs ORDER BY id DESC lists the jobs';
    END IF;
    RETURN v_status;  -- already succeeded, failed or cancelled
END $$;

-- pgml.tune() as in 0003_tune, with the secret keys from pgml._secret_keys() and no NOTIFY of its own (the jobs
-- trigger sends it). Its search_path is still the caller's, so unqualified relation names resolve as they
-- would for the caller; the security work pins it (and runs it as its owner).
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
    priority             integer DEFAULT 0
) RETURNS TABLE (job_id bigint, status text, project_id bigint, model_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_task     text := tune.task;
    v_project  pgml.projects;
    v_rel      regclass;
    v_relkind  "char";
    v_schema   text;
    v_table    text;
    v_hp       jsonb := coalesce(tune.hyperparams, '{}');
    v_clean    jsonb;
    v_secrets  jsonb;
    v_sealed   text;
    v_dargs    jsonb;
    v_taskrow  pgml.tasks;
    v_arg      text;
    v_col      text;
    v_model_id bigint;
    v_job_id   bigint;
    v_known    text;
BEGIN
    -- project and task
    IF project_name IS NULL OR btrim(project_name) = '' THEN
        PERFORM pgml._fail('project_name is required', 'pass a name, e.g. pgml.tune(''my_project'', ...)');
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name;
    IF v_task IS NULL THEN
        v_task := v_project.task;
        IF v_task IS NULL THEN
            PERFORM pgml._fail(format('task is required: project %L does not exist yet', project_name),
                               'pass task => ''text-classification'' (or another task in pgml.tasks)');
        END IF;
    END IF;
    SELECT * INTO v_taskrow FROM pgml.tasks t WHERE t.name = v_task;
    IF NOT FOUND THEN
        SELECT string_agg(quote_literal(t.name), ', ' ORDER BY t.name) INTO v_known FROM pgml.tasks t;
        PERFORM pgml._fail(format('unknown task %L', v_task), format('tasks are: %s', v_known));
    END IF;
    IF v_project.task IS NOT NULL AND v_project.task <> v_task THEN
        PERFORM pgml._fail(format('project %L is a %s project, not %s', project_name, v_project.task, v_task),
                           'use another project_name for another task');
    END IF;

    -- hyperparams
    IF jsonb_typeof(v_hp) <> 'object' THEN
        PERFORM pgml._fail(format('hyperparams must be a JSON object, got a JSON %s', jsonb_typeof(v_hp)),
                           'e.g. hyperparams => ''{"training_args": {"num_train_epochs": 1}}''');
    END IF;
    FOR v_arg IN SELECT k FROM jsonb_object_keys(v_hp) k
                 WHERE k <> ALL (v_taskrow.hyperparams || pgml._secret_keys()) LOOP
        PERFORM pgml._fail(format('unknown hyperparams key %L for task %s', v_arg, v_task),
                           format('keys for %s are: %s', v_task, array_to_string(v_taskrow.hyperparams, ', ')));
    END LOOP;
    FOREACH v_arg IN ARRAY ARRAY['training_args', 'dataset_args', 'lora_config'] LOOP
        IF v_hp ? v_arg AND jsonb_typeof(v_hp -> v_arg) <> 'object' THEN
            PERFORM pgml._fail(format('hyperparams.%s must be a JSON object, got a JSON %s', v_arg,
                                      jsonb_typeof(v_hp -> v_arg)),
                               format('e.g. "%s": {"key": "value"}', v_arg));
        END IF;
    END LOOP;

    -- test split
    IF test_size IS NULL OR test_size <= 0 OR test_size = 1 OR (test_size > 1 AND test_size <> trunc(test_size))
    THEN
        PERFORM pgml._fail(format('test_size %s is out of range', coalesce(test_size::text, 'NULL')),
            'use a fraction between 0 and 1 (0.2 = 20% of rows for evaluation) or a whole row count of at least 2');
    END IF;
    IF test_sampling IS NULL OR test_sampling NOT IN ('last', 'random', 'stratified') THEN
        PERFORM pgml._fail(format('unknown test_sampling %L', test_sampling),
                           'use ''last'' (relation order), ''random'' or ''stratified'' (by class)');
    END IF;
    IF model_name IS NULL OR btrim(model_name) = '' THEN
        PERFORM pgml._fail('model_name is required',
            'pass a Hugging Face model id, a directory on the workers, or pgml:<project> / pgml:model:<id>');
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        PERFORM pgml._fail('max_attempts must be at least 1', 'max_attempts => 3 retries a job whose worker died');
    END IF;

    -- relation and columns
    IF v_task <> 'noop' OR relation_name IS NOT NULL THEN
        IF relation_name IS NULL OR btrim(relation_name) = '' THEN
            PERFORM pgml._fail('relation_name is required', 'pass the table or view to train on, e.g. ''public.reviews''');
        END IF;
        BEGIN
            v_rel := to_regclass(relation_name);
        EXCEPTION WHEN OTHERS THEN
            PERFORM pgml._fail(format('relation_name %L is not a valid relation name: %s', relation_name, SQLERRM),
                               'write schema.table, double-quoting names that need it: ''"My Schema"."My Table"''');
        END;
        IF v_rel IS NULL THEN
            PERFORM pgml._fail(format('relation %L does not exist', relation_name),
                'check the spelling and schema (search_path is ' || current_setting('search_path') || ')',
                'undefined_table');
        END IF;
        SELECT c.relkind, n.nspname, c.relname INTO v_relkind, v_schema, v_table
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel;
        IF v_relkind NOT IN ('r', 'v', 'm', 'p', 'f') THEN
            PERFORM pgml._fail(format('%s is not a table or view', v_rel), 'pass a table, view or materialized view');
        END IF;
        IF NOT has_table_privilege(v_rel, 'SELECT') THEN
            PERFORM pgml._fail(format('permission denied: %s may not SELECT from %s', current_user, v_rel),
                               format('GRANT SELECT ON %s TO %I', v_rel, current_user), 'insufficient_privilege');
        END IF;
        v_dargs := coalesce(v_hp -> 'dataset_args', '{}');
        FOR v_arg, v_col IN SELECT key, value FROM jsonb_each_text(v_taskrow.required_columns) LOOP
            v_col := coalesce(v_dargs ->> v_arg, CASE WHEN v_arg = 'class_column' THEN y_column_name END, v_col);
            IF v_col IS NULL THEN
                PERFORM pgml._fail(format('dataset_args.%s is required for task %s', v_arg, v_task),
                    format('set "dataset_args": {"%s": "<column>"} in hyperparams (or y_column_name)', v_arg));
            END IF;
            PERFORM pgml._check_column(v_rel, v_arg, v_col, v_arg = ANY (v_taskrow.text_columns));
        END LOOP;
        FOREACH v_arg IN ARRAY v_taskrow.optional_columns LOOP
            IF v_dargs ? v_arg THEN
                PERFORM pgml._check_column(v_rel, v_arg, v_dargs ->> v_arg, v_arg = ANY (v_taskrow.text_columns));
            END IF;
        END LOOP;
        IF y_column_name IS NOT NULL AND NOT v_dargs ? 'class_column' AND v_taskrow.required_columns ? 'class_column'
        THEN
            v_hp := jsonb_set(v_hp, '{dataset_args}', v_dargs || jsonb_build_object('class_column', y_column_name));
        END IF;
    END IF;

    -- secrets: sealed with the workers' public key, removed from everything stored in clear
    SELECT s.clean, s.secrets INTO v_clean, v_secrets FROM pgml._split_secrets(v_hp) s;
    IF v_secrets <> '{}' THEN
        v_sealed := pgml._seal(v_secrets);
    END IF;

    INSERT INTO pgml.projects AS p (name, task) VALUES (project_name, v_task)
    ON CONFLICT (name) DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;

    INSERT INTO pgml.models (project_id, task, model_name, relation_name, hyperparams)
    VALUES (v_project.id, v_task, tune.model_name, tune.relation_name, v_clean)
    RETURNING id INTO v_model_id;

    INSERT INTO pgml.jobs (project_id, model_id, task, relation_name, relation_schema, relation_table, model_name,
                           test_size, test_sampling, hyperparams, secrets, priority, max_attempts)
    VALUES (v_project.id, v_model_id, v_task, tune.relation_name, v_schema, v_table, tune.model_name,
            tune.test_size, tune.test_sampling, v_clean, v_sealed, tune.priority, tune.max_attempts)
    RETURNING id INTO v_job_id;

    -- the jobs trigger wakes the workers (NOTIFY pgml_jobs) when this transaction commits
    RETURN QUERY SELECT v_job_id, 'queued'::text, v_project.id, v_model_id;
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0006_typed_notices') ON CONFLICT DO NOTHING;
