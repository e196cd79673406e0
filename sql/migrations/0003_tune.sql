-- 0003_tune: pgml.tune(), the PostgresML-compatible entry point. It validates what SQL can check, queues a job
-- and NOTIFYs the workers, then returns at once. Nothing is queued when it raises.
-- Plain SQL, idempotent, runnable with psql.

-- Tasks the workers know, with the dataset_args each one reads. Adding a task = a recipe module + a row here.
CREATE TABLE IF NOT EXISTS pgml.tasks (
    name             text PRIMARY KEY,
    required_columns jsonb NOT NULL,   -- {"dataset_args key": "default column name or null"}
    text_columns     text[] NOT NULL,  -- dataset_args keys whose columns must be of a string type
    optional_columns text[] NOT NULL DEFAULT '{}',
    hyperparams      text[] NOT NULL DEFAULT '{}'  -- top-level hyperparams keys the task reads
);
INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('text-classification', '{"text_column": "text", "class_column": null}', '{text_column}', '{}',
        '{training_args,dataset_args,max_seq_length}'),
    ('text-pair-classification', '{"text1_column": "text1", "text2_column": "text2", "class_column": null}',
        '{text1_column,text2_column}', '{}', '{training_args,dataset_args,max_seq_length}'),
    ('conversation', '{"user_column": "user", "assistant_column": "assistant"}',
        '{user_column,assistant_column,system_column}', '{system_column}',
        '{training_args,dataset_args,lora_config,load_in_8bit,load_in_4bit,max_seq_length,prompt_template,'
        'train_on,packing,torch_dtype,attn_implementation}'),
    -- a diagnostic task: runs a child process that sleeps hyperparams.seconds; used to test queues and ops
    ('noop', '{}', '{}', '{}', '{seconds,steps,fail}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

CREATE OR REPLACE FUNCTION pgml._fail(message text, hint text, code text DEFAULT 'invalid_parameter_value')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, HINT = hint, ERRCODE = code;
END $$;

-- Removes every secret from the hyperparams; returns (clean hyperparams, secrets object).
CREATE OR REPLACE FUNCTION pgml._split_secrets(hyperparams jsonb, OUT clean jsonb, OUT secrets jsonb)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text;
BEGIN
    clean := hyperparams;
    secrets := '{}';
    FOREACH k IN ARRAY ARRAY['token', 'hub_token', 'use_auth_token'] LOOP
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

-- Checks that `col` names a column of relation `rel`; when `want_text`, that it has a string type.
CREATE OR REPLACE FUNCTION pgml._check_column(rel regclass, arg text, col text, want_text boolean)
RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    typ_category "char";
    typ_name text;
    available text;
BEGIN
    SELECT t.typcategory, format_type(a.atttypid, a.atttypmod) INTO typ_category, typ_name
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO available
        FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
        PERFORM pgml._fail(format('column %L (dataset_args.%s) does not exist in %s', col, arg, rel),
            format('columns of %s are: %s. Set "dataset_args": {"%s": "<column>"} in hyperparams.',
                   rel, coalesce(available, '(none)'), arg), 'undefined_column');
    END IF;
    IF want_text AND typ_category <> 'S' THEN
        PERFORM pgml._fail(format('column %L (dataset_args.%s) of %s has type %s, but it must hold text',
                                  col, arg, rel, typ_name),
            format('cast it in a view, e.g. CREATE VIEW v AS SELECT %I::text AS %I, ... FROM %s', col, col, rel),
            'datatype_mismatch');
    END IF;
END $$;

DROP FUNCTION IF EXISTS pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean, integer,
                                  integer);
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
                 WHERE k <> ALL (v_taskrow.hyperparams || ARRAY['token', 'hub_token', 'use_auth_token']) LOOP
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

    PERFORM pg_notify('pgml_jobs', v_job_id::text);
    RETURN QUERY SELECT v_job_id, 'queued'::text, v_project.id, v_model_id;
END $$;

COMMENT ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                              integer, integer) IS
    'Queue a fine-tuning job (PostgresML API). Returns at once; a pgml-tuned worker trains it. '
    'Follow it with CALL pgml.wait(job_id) or SELECT * FROM pgml.jobs.';

INSERT INTO pgml.schema_migrations (version) VALUES ('0003_tune') ON CONFLICT DO NOTHING;
