-- Submitting a job: pgml.tune() and the checks it runs in SQL (task, columns, limits, resources, training_args),
-- the rows copied into a job table, the tune_requests view the guide inserts into.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

CREATE OR REPLACE FUNCTION pgml._fail(message text, hint text, code text DEFAULT 'invalid_parameter_value')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, HINT = hint, ERRCODE = code;
END $$;

-- (since 0007) bounds every submitted job must respect, checked as the job row is written (by pgml.tune()
-- or any later entry point), so nothing out of bounds is ever queued.

CREATE OR REPLACE FUNCTION pgml._check_job_limits() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_bytes integer := octet_length(NEW.hyperparams::text);
BEGIN
    IF v_bytes > 65536 THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('hyperparams is %s bytes of JSON; at most 65536 are accepted', v_bytes),
            HINT = 'hyperparams holds settings; put data in the relation the job trains on';
    END IF;
    IF NEW.max_attempts > 20 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('max_attempts %s is more than 20', NEW.max_attempts),
            HINT = 'max_attempts counts workers lost mid-job; a few (the default is 3) is plenty';
    END IF;
    RETURN NEW;
END $$;

-- Inserts are calls: INSERT INTO pgml.tune_requests (...) VALUES (...) RETURNING job_id queues exactly as
-- pgml.tune() does (same checks, same snapshot, same submitter), for clients that can only write rows.
-- (It reads no table; security_barrier as every view a user reads: tests/security/test_view_leaks.py.)
CREATE OR REPLACE VIEW pgml.tune_requests WITH (security_barrier = true) AS
SELECT NULL::text AS project_name, NULL::text AS task, NULL::text AS relation_name, NULL::text AS y_column_name,
       NULL::text AS model_name, NULL::jsonb AS hyperparams, NULL::double precision AS test_size,
       NULL::text AS test_sampling, NULL::boolean AS automatic_deploy, NULL::boolean AS materialize_snapshot,
       NULL::integer AS max_attempts, NULL::integer AS priority,
       NULL::bigint AS job_id, NULL::text AS status, NULL::bigint AS project_id, NULL::bigint AS model_id
WHERE false;

-- END training_arg_types

-- pgml._check_column: as in 0003, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._check_column(rel regclass, arg text, col text, want_text boolean)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
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
        RAISE EXCEPTION USING MESSAGE = format('column %L (dataset_args.%s) does not exist in %s', col, arg, rel),
            HINT = format('columns of %s are: %s. Set "dataset_args": {"%s": "<column>"} in hyperparams.',
                   rel, coalesce(available, '(none)'), arg),
            ERRCODE = 'undefined_column';
    END IF;
    IF want_text AND typ_category <> 'S' THEN
        RAISE EXCEPTION USING MESSAGE = format('column %L (dataset_args.%s) of %s has type %s, but it must hold text',
                                  col, arg, rel, typ_name),
            HINT = format('cast it in a view, e.g. CREATE VIEW v AS SELECT %I::text AS %I, ... FROM %s', col, col, rel),
            ERRCODE = 'datatype_mismatch';
    END IF;
END $$;

-- (since 0040) The dataset_args of the retrieval tasks that SQL can check before any row is read: a score or label
-- column of a number type, not both a hard negative and a score (one loss each), Matryoshka dimensions that are
-- decreasing positive whole numbers. `dargs` carries the relation's name under "_relation" for the messages.
CREATE OR REPLACE FUNCTION pgml._check_retrieval_args(task text, rel regclass, dargs jsonb)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_arg  text := CASE task WHEN 'text-ranking' THEN 'label_column' ELSE 'score_column' END;
    v_col  text := coalesce(dargs ->> v_arg, CASE task WHEN 'text-ranking' THEN 'label' END);
    v_cat  "char";
    v_type text;
    v_dims jsonb := dargs -> 'matryoshka_dims';
    v_prev numeric;
    v_dim  jsonb;
    v_bad  boolean;
BEGIN
    IF v_col IS NOT NULL THEN
        SELECT t.typcategory, format_type(a.atttypid, a.atttypmod) INTO v_cat, v_type
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = rel AND a.attname = v_col AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_cat <> 'N' AND NOT (task = 'text-ranking' AND v_cat = 'B') THEN
            RAISE EXCEPTION USING ERRCODE = 'datatype_mismatch',
                MESSAGE = format('column %L (dataset_args.%s) of %s has type %s, but it must hold numbers', v_col, v_arg,
                                 dargs ->> '_relation', v_type),
                HINT = CASE task WHEN 'text-ranking'
                    THEN 'labels are 0/1 (or a relevance score in [0, 1]) of a number or boolean type; cast it in a view'
                    ELSE 'scores are numbers in [0, 1] or [-1, 1] (a real or numeric column); cast it in a view' END;
        END IF;
    END IF;
    IF task <> 'text-embedding' THEN
        RETURN;
    END IF;
    IF dargs ? 'negative_column' AND dargs ? 'score_column' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'dataset_args gives both negative_column and score_column',
            HINT = 'give negative_column (a hard negative per pair: MultipleNegativesRankingLoss) or score_column '
                   '(graded pairs: CoSENTLoss), not both';
    END IF;
    IF v_dims IS NOT NULL THEN
        IF jsonb_typeof(v_dims) <> 'array' OR jsonb_array_length(v_dims) = 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('dataset_args.matryoshka_dims must be a JSON array of dimensions, not %s',
                                 left(v_dims::text, 60)),
                HINT = 'e.g. "matryoshka_dims": [384, 256, 128, 64] (decreasing; the first is at most the model''s)';
        END IF;
        FOR v_dim IN SELECT e FROM jsonb_array_elements(v_dims) e LOOP
            v_bad := jsonb_typeof(v_dim) <> 'number';
            IF NOT v_bad THEN
                v_bad := (v_dim #>> '{}')::numeric <> trunc((v_dim #>> '{}')::numeric) OR (v_dim #>> '{}')::numeric < 1
                         OR coalesce((v_dim #>> '{}')::numeric >= v_prev, false);
            END IF;
            IF v_bad THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    MESSAGE = format('dataset_args.matryoshka_dims %s: each dimension must be a positive whole number, '
                                     'smaller than the one before', left(v_dims::text, 60)),
                    HINT = 'e.g. "matryoshka_dims": [384, 256, 128, 64] (decreasing; the first is at most the model''s)';
            END IF;
            v_prev := (v_dim #>> '{}')::numeric;
        END LOOP;
    END IF;
END $$;

-- (since 0040) The rows of a retrieval job, once pgml.tune copied them into the job's table: no NULL where a value
-- is needed, two distinct anchors (queries) at least (one to train on, one to hold out), scores in the loss's range
-- (CoSENT: [-1, 1]; the reranker's binary cross-entropy: labels in [0, 1]).
CREATE OR REPLACE FUNCTION pgml._check_retrieval_rows(job pgml.jobs)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_dargs  jsonb := coalesce(job.hyperparams -> 'dataset_args', '{}');
    v_task   pgml.tasks;
    v_table  text := format('pgml_rows.%I', pgml._job_table(job.id));
    v_key    text := CASE job.task WHEN 'text-ranking' THEN 'query_column' ELSE 'anchor_column' END;
    v_score  text := CASE job.task WHEN 'text-ranking' THEN 'label_column' ELSE 'score_column' END;
    v_arg    text;
    v_col    text;
    v_n      bigint;
    v_lo     numeric;
    v_hi     numeric;
    v_min    numeric := CASE job.task WHEN 'text-ranking' THEN 0 ELSE -1 END;
BEGIN
    SELECT * INTO v_task FROM pgml.tasks t WHERE t.name = job.task;
    FOR v_arg IN SELECT k FROM jsonb_object_keys(v_task.required_columns) k
                 UNION ALL SELECT o FROM unnest(v_task.optional_columns) o WHERE v_dargs ? o LOOP
        v_col := coalesce(v_dargs ->> v_arg, v_task.required_columns ->> v_arg);
        EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL', v_table,
                       'c' || array_position(job.snapshot_columns, v_col)) INTO v_n;
        IF v_n > 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
                MESSAGE = format('column %L (dataset_args.%s) of %s is NULL in %s rows', v_col, v_arg,
                                 job.relation_name, v_n),
                HINT = format('leave those rows out in a view: CREATE VIEW v AS SELECT ... FROM %s WHERE %I IS NOT NULL',
                              job.relation_name, v_col);
        END IF;
    END LOOP;
    v_col := coalesce(v_dargs ->> v_key, v_task.required_columns ->> v_key);
    EXECUTE format('SELECT count(DISTINCT %I) FROM %s', 'c' || array_position(job.snapshot_columns, v_col), v_table)
        INTO v_n;
    IF v_n < 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('column %L (dataset_args.%s) of %s has %s distinct value%s; at least 2 are needed', v_col,
                             v_key, job.relation_name, v_n, CASE WHEN v_n = 1 THEN '' ELSE 's' END),
            HINT = format('rows are held out by %s (some to train on, some to evaluate): give pairs of several %ss',
                          replace(v_key, '_column', ''), replace(v_key, '_column', ''));
    END IF;
    v_col := coalesce(v_dargs ->> v_score, v_task.required_columns ->> v_score);
    IF v_col IS NOT NULL THEN
        -- a boolean label column arrives as 'true' / 'false'
        EXECUTE format('SELECT min(v), max(v) FROM (SELECT CASE %1$I WHEN ''true'' THEN 1 WHEN ''false'' THEN 0 '
                       'ELSE %1$I::numeric END AS v FROM %2$s) s',
                       'c' || array_position(job.snapshot_columns, v_col), v_table) INTO v_lo, v_hi;
        IF v_lo < v_min OR v_hi > 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = format('column %L (dataset_args.%s) of %s has values from %s to %s, outside [%s, 1]', v_col,
                                 v_score, job.relation_name, v_lo, v_hi, v_min),
                HINT = CASE job.task WHEN 'text-ranking'
                    THEN 'labels are 0 (not relevant) to 1 (relevant): rescale them in a view, e.g. label / 5.0'
                    ELSE 'scores are similarities in [-1, 1] (or [0, 1]): rescale them in a view, e.g. score / 5.0' END;
        END IF;
    END IF;
END $$;

-- pgml._submit: as in 0009, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._submit(
    project_name         text,
    task                 text,
    relation_name        text,
    y_column_name        text,
    model_name           text,
    hyperparams          jsonb,
    test_size            double precision,
    test_sampling        text,
    automatic_deploy     boolean,
    materialize_snapshot boolean,
    max_attempts         integer,
    priority             integer,
    caller_search_path   text,
    rel                  oid,   -- relation_name as the caller resolved it (NULL: not found)
    rel_error            text   -- why the caller could not resolve it, if it could not
) RETURNS TABLE (job_id bigint, project_id bigint, model_id bigint, relation text, columns text[])
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task     text := _submit.task;
    v_project  pgml.projects;
    v_rel      regclass;
    v_relkind  "char";
    v_schema   text;
    v_table    text;
    v_hp       jsonb := coalesce(_submit.hyperparams, '{}');
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
    v_cols     text[] := '{}';
    -- session_user, or through the loopback (pgml.tune(..., wait => true)) the user who called pgml.tune
    v_who      name := pgml._submitter();
    v_admin    boolean := pg_has_role(v_who, 'pgml_admin', 'MEMBER');
    v_relname  text;
    v_cred     text;
    v_bad      record;
    v_lim      pgml.role_limits;
    v_queued   bigint;
BEGIN
    -- project and task
    IF project_name IS NULL OR btrim(project_name) = '' THEN
        RAISE EXCEPTION USING MESSAGE = 'project_name is required',
            HINT = 'pass a name, e.g. pgml.tune(''my_project'', ...)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name AND p.owner = v_who;
    IF v_task IS NULL THEN
        v_task := v_project.task;
        IF v_task IS NULL THEN
            RAISE EXCEPTION USING MESSAGE = format('task is required: project %L does not exist yet', project_name),
                HINT = 'pass task => ''text-classification'' (or another task in pgml.tasks)',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    SELECT * INTO v_taskrow FROM pgml.tasks t WHERE t.name = v_task;
    IF NOT FOUND THEN
        SELECT string_agg(quote_literal(t.name), ', ' ORDER BY t.name) INTO v_known FROM pgml.tasks t;
        RAISE EXCEPTION USING MESSAGE = format('unknown task %L', v_task),
            HINT = format('tasks are: %s', v_known),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_taskrow.admin_only AND NOT v_admin THEN
        RAISE EXCEPTION USING MESSAGE = format('task %L is a diagnostic task for administrators', v_task),
            HINT = format('a member of pgml_admin may run it (GRANT pgml_admin TO %I)', v_who),
            ERRCODE = 'insufficient_privilege';
    END IF;
    IF priority > 0 AND NOT v_admin THEN
        RAISE EXCEPTION USING MESSAGE = format('priority %s: a priority above 0 is for administrators', priority),
            HINT = 'leave priority out (0), or ask a member of pgml_admin to raise it',
            ERRCODE = 'insufficient_privilege';
    END IF;
    IF v_project.task IS NOT NULL AND v_project.task <> v_task THEN
        RAISE EXCEPTION USING MESSAGE = format('project %L is a %s project, not %s', project_name, v_project.task, v_task),
            HINT = 'use another project_name for another task',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the queue limit counts the jobs being submitted too: pgml._submit called on its own, any number of times in
    -- one transaction, holds no more than the queue may (and no job is ever committed while 'submitting': the
    -- constraint trigger jobs_submitted_at_commit below). Only those are counted here, an index's few rows;
    -- pgml._submitted counts the queued ones with them.
    v_lim := pgml._role_limits(v_who);
    IF v_lim.max_queued IS NOT NULL THEN
        SELECT count(*) INTO v_queued FROM pgml.jobs j
        WHERE j.submitted_by = v_who AND j.status = 'submitting';
        IF v_queued >= v_lim.max_queued THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = format('%s has %s jobs being submitted; the limit for %s is %s jobs in the queue',
                                 v_who, v_queued, v_lim.role, v_lim.max_queued),
                HINT = 'wait for some to start, cancel some (pgml.cancel), or ask an administrator (pgml.role_limits)';
        END IF;
    END IF;
    -- predict_batch and embed_batch write pgml.<output_table>: the name is checked here, where pgml_user's rights
    -- do not reach
    IF v_task IN ('predict_batch', 'embed_batch') THEN
        PERFORM pgml._check_output_table(coalesce(_submit.hyperparams, '{}') ->> 'output_table', v_who);
    END IF;

    -- hyperparams
    IF jsonb_typeof(v_hp) <> 'object' THEN
        RAISE EXCEPTION USING MESSAGE = format('hyperparams must be a JSON object, got a JSON %s', jsonb_typeof(v_hp)),
            HINT = 'e.g. hyperparams => ''{"training_args": {"num_train_epochs": 1}}''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_arg IN SELECT k FROM jsonb_object_keys(v_hp) k
                 WHERE k <> ALL (v_taskrow.hyperparams || pgml._secret_keys() || 'hub_credential'::text) LOOP
        RAISE EXCEPTION USING MESSAGE = format('unknown hyperparams key %L for task %s', v_arg, v_task),
            HINT = format('keys for %s are: %s', v_task, array_to_string(v_taskrow.hyperparams, ', ')),
            ERRCODE = 'invalid_parameter_value';
    END LOOP;
    FOREACH v_arg IN ARRAY ARRAY['training_args', 'dataset_args', 'lora_config'] LOOP
        IF v_hp ? v_arg AND jsonb_typeof(v_hp -> v_arg) <> 'object' THEN
            RAISE EXCEPTION USING MESSAGE = format('hyperparams.%s must be a JSON object, got a JSON %s', v_arg,
                                      jsonb_typeof(v_hp -> v_arg)),
                HINT = format('e.g. "%s": {"key": "value"}', v_arg),
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- training_args values of the types transformers declares for them (pgml.training_arg_types): found here,
    -- not as "could not convert string to float" in the worker
    SELECT a.key, a.value, t.python_type, t.json_types, t.example INTO v_bad
    FROM jsonb_each(CASE WHEN jsonb_typeof(v_hp -> 'training_args') = 'object' THEN v_hp -> 'training_args'
                         ELSE '{}' END) a
    JOIN pgml.training_arg_types t ON t.key = a.key
    WHERE NOT (jsonb_typeof(a.value) = ANY (t.json_types)
               OR (jsonb_typeof(a.value) = 'number' AND 'integer' = ANY (t.json_types)
                   AND (a.value #>> '{}')::numeric = trunc((a.value #>> '{}')::numeric)))
    ORDER BY a.key LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            MESSAGE = format('training_args.%s must be %s, not %s', v_bad.key,
                (SELECT string_agg(CASE k WHEN 'integer' THEN 'a whole number' WHEN 'number' THEN 'a number'
                                          WHEN 'boolean' THEN 'true or false' WHEN 'string' THEN 'a string'
                                          WHEN 'object' THEN 'a JSON object' WHEN 'array' THEN 'a JSON array'
                                          ELSE 'null' END, ' or ' ORDER BY o)
                 FROM unnest(v_bad.json_types) WITH ORDINALITY AS u (k, o)),
                CASE WHEN v_bad.key = ANY (pgml._secret_keys()) THEN 'a JSON ' || jsonb_typeof(v_bad.value)
                     WHEN jsonb_typeof(v_bad.value) = 'string' THEN 'the string ' || left(v_bad.value::text, 60)
                     ELSE left(v_bad.value::text, 60) END),
            HINT = format('transformers.TrainingArguments declares %s: %s. Write it as JSON, e.g. "%s": %s',
                          v_bad.key, v_bad.python_type, v_bad.key, v_bad.example),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- and within the range transformers accepts (the same table: min_value .. max_value, also_allowed)
    SELECT a.key, a.value, t.min_value, t.min_inclusive, t.max_value, t.max_inclusive, t.also_allowed, t.example
    INTO v_bad
    FROM jsonb_each(CASE WHEN jsonb_typeof(v_hp -> 'training_args') = 'object' THEN v_hp -> 'training_args'
                         ELSE '{}' END) a
    JOIN pgml.training_arg_types t ON t.key = a.key
    CROSS JOIN LATERAL (SELECT (a.value #>> '{}')::numeric AS n WHERE jsonb_typeof(a.value) = 'number') v
    WHERE NOT v.n = ANY (coalesce(t.also_allowed, '{}'))
      AND (v.n < t.min_value OR (v.n = t.min_value AND NOT t.min_inclusive)
           OR v.n > t.max_value OR (v.n = t.max_value AND NOT t.max_inclusive))
    ORDER BY a.key LIMIT 1;
    IF FOUND THEN
        v_known := concat_ws(' and ',
            CASE WHEN v_bad.min_inclusive THEN 'at least ' ELSE 'greater than ' END || v_bad.min_value,
            CASE WHEN v_bad.max_inclusive THEN 'at most ' ELSE 'less than ' END || v_bad.max_value)
            || coalesce(', or ' || array_to_string(v_bad.also_allowed, ' or '), '');
        RAISE EXCEPTION USING
            MESSAGE = format('training_args.%s = %s is out of range: it must be %s', v_bad.key, v_bad.value, v_known),
            HINT = format('transformers accepts %s %s; e.g. "%s": %s', v_bad.key, v_known, v_bad.key,
                          v_bad.example),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_hp ? 'max_seq_length' AND NOT (jsonb_typeof(v_hp -> 'max_seq_length') = 'number'
            AND (v_hp ->> 'max_seq_length')::numeric = trunc((v_hp ->> 'max_seq_length')::numeric)
            AND (v_hp ->> 'max_seq_length')::numeric >= 1) THEN
        RAISE EXCEPTION USING
            MESSAGE = format('hyperparams.max_seq_length must be a whole number of tokens, at least 1, not %s',
                             left((v_hp -> 'max_seq_length')::text, 60)),
            HINT = 'e.g. "max_seq_length": 256 (at most the model''s own limit: the job fails before training above it)',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- test split
    IF test_size IS NULL OR test_size <= 0 OR test_size = 1 OR (test_size > 1 AND test_size <> trunc(test_size))
    THEN
        RAISE EXCEPTION USING MESSAGE = format('test_size %s is out of range', coalesce(test_size::text, 'NULL')),
            HINT = 'use a fraction between 0 and 1 (0.2 = 20% of rows for evaluation) or a whole row count of at least 2',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF test_sampling IS NULL OR test_sampling NOT IN ('last', 'random', 'stratified') THEN
        RAISE EXCEPTION USING MESSAGE = format('unknown test_sampling %L', test_sampling),
            HINT = 'use ''last'' (relation order), ''random'' or ''stratified'' (by class)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF model_name IS NULL OR btrim(model_name) = '' THEN
        RAISE EXCEPTION USING MESSAGE = 'model_name is required',
            HINT = 'pass a Hugging Face model id, a directory on the workers, or pgml:<project> / pgml:model:<id>',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION USING MESSAGE = 'max_attempts must be at least 1',
            HINT = 'max_attempts => 3 retries a job whose worker died',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- relation and columns
    IF v_task <> 'noop' OR relation_name IS NOT NULL THEN
        IF relation_name IS NULL OR btrim(relation_name) = '' THEN
            RAISE EXCEPTION USING MESSAGE = 'relation_name is required',
                HINT = 'pass the table or view to train on, e.g. ''public.reviews''',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF rel_error IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = format('relation_name %L is not a valid relation name: %s', relation_name, rel_error),
                HINT = 'write schema.table, double-quoting names that need it: ''"My Schema"."My Table"''',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        v_rel := rel;
        IF v_rel IS NULL THEN
            RAISE EXCEPTION USING MESSAGE = format('relation %L does not exist', relation_name),
                HINT = 'check the spelling and schema (search_path is ' || coalesce(caller_search_path, '') || ')',
                ERRCODE = 'undefined_table';
        END IF;
        SELECT c.relkind, n.nspname, c.relname INTO v_relkind, v_schema, v_table
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel;
        IF NOT FOUND THEN  -- resolved by the caller, but not there for this submission: pgml.tune(..., wait => true)
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
                MESSAGE = format('relation %L is not committed yet: pgml.tune(..., wait => true) submits in a '
                                 'session of its own, which sees only committed relations', relation_name),
                HINT = 'COMMIT the transaction that created it first; or call pgml.tune without wait => true in this '
                       'transaction, COMMIT, then CALL pgml.wait(job_id)';
        END IF;
        IF v_relkind NOT IN ('r', 'v', 'm', 'p', 'f') THEN
            RAISE EXCEPTION USING MESSAGE = format('%s is not a table or view', v_rel),
                HINT = 'pass a table, view or materialized view',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT has_table_privilege(v_who, v_rel, 'SELECT') THEN
            RAISE EXCEPTION USING MESSAGE = format('permission denied: %s may not SELECT from %s', v_who, v_rel),
                HINT = format('GRANT SELECT ON %s TO %I', v_rel, v_who),
                ERRCODE = 'insufficient_privilege';
        END IF;
        v_relname := format('%I.%I', v_schema, v_table);
        v_dargs := coalesce(v_hp -> 'dataset_args', '{}');
        FOR v_arg, v_col IN SELECT key, value FROM jsonb_each_text(v_taskrow.required_columns) LOOP
            v_col := coalesce(v_dargs ->> v_arg, CASE WHEN v_arg = 'class_column' THEN y_column_name END, v_col);
            IF v_col IS NULL THEN
                RAISE EXCEPTION USING MESSAGE = format('dataset_args.%s is required for task %s', v_arg, v_task),
                    HINT = format('set "dataset_args": {"%s": "<column>"} in hyperparams (or y_column_name)', v_arg),
                    ERRCODE = 'invalid_parameter_value';
            END IF;
            PERFORM pgml._check_column(v_rel, v_arg, v_col, v_arg = ANY (v_taskrow.text_columns));
            v_cols := v_cols || v_col;
        END LOOP;
        FOREACH v_arg IN ARRAY v_taskrow.optional_columns LOOP
            IF v_dargs ? v_arg THEN
                PERFORM pgml._check_column(v_rel, v_arg, v_dargs ->> v_arg, v_arg = ANY (v_taskrow.text_columns));
                v_cols := v_cols || (v_dargs ->> v_arg);
            END IF;
        END LOOP;
        IF v_task IN ('text-embedding', 'text-ranking') THEN
            PERFORM pgml._check_retrieval_args(v_task, v_rel, v_dargs || jsonb_build_object('_relation', v_relname));
        END IF;
        IF y_column_name IS NOT NULL AND NOT v_dargs ? 'class_column' AND v_taskrow.required_columns ? 'class_column'
        THEN
            v_hp := jsonb_set(v_hp, '{dataset_args}', v_dargs || jsonb_build_object('class_column', y_column_name));
        END IF;
    END IF;

    -- secrets: a named credential the caller may use (recorded by name), or inline tokens sealed for this job
    -- and this submitter with the active sealing key; removed from everything stored in clear
    SELECT s.clean, s.secrets INTO v_clean, v_secrets FROM pgml._split_secrets(v_hp) s;
    IF v_clean ? 'hub_credential' THEN
        IF jsonb_typeof(v_clean -> 'hub_credential') <> 'string' THEN
            RAISE EXCEPTION USING MESSAGE = 'hyperparams.hub_credential must be a credential name (a JSON string)',
                HINT = 'e.g. "hub_credential": "my-org-token"',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        v_cred := v_clean ->> 'hub_credential';
        v_clean := v_clean - 'hub_credential';
        IF v_secrets <> '{}' THEN
            RAISE EXCEPTION USING MESSAGE = 'hyperparams has both hub_credential and an inline token',
                HINT = 'pass one: "hub_credential": "<name>" (recommended) or the token',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pgml.credentials c WHERE c.name = v_cred) THEN
            RAISE EXCEPTION USING MESSAGE = format('unknown credential %L', v_cred),
                HINT = format('an administrator creates it on the workers and allows it: SELECT pgml.allow_credential(%L, %L)',
                       v_cred, v_who),
                ERRCODE = 'undefined_object';
        END IF;
        IF NOT pgml._may_use_credential(v_who, v_cred) THEN
            RAISE EXCEPTION USING MESSAGE = format('permission denied: %s may not use credential %L', v_who, v_cred),
                HINT = format('ask an administrator: SELECT pgml.allow_credential(%L, %L)', v_cred, v_who),
                ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    v_job_id := nextval(pg_get_serial_sequence('pgml.jobs', 'id'));
    IF v_secrets <> '{}' THEN
        v_sealed := pgml._seal(v_secrets, v_job_id, v_who);
    END IF;

    INSERT INTO pgml.projects AS p (name, task, owner) VALUES (project_name, v_task, v_who)
    ON CONFLICT (owner, name) DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;

    INSERT INTO pgml.models (project_id, task, model_name, relation_name, hyperparams, owner)
    VALUES (v_project.id, v_task, _submit.model_name, _submit.relation_name, v_clean, v_who)
    RETURNING id INTO v_model_id;

    -- 'submitting': invisible to workers until pgml._submitted() has seen the rows arrive. Nothing commits the job
    -- before that (a caller's SET CONSTRAINTS ... IMMEDIATE would refuse it at this INSERT: deferred again here)
    SET CONSTRAINTS pgml.jobs_submitted_at_commit DEFERRED;
    INSERT INTO pgml.jobs (id, project_id, model_id, task, relation_name, relation_schema, relation_table,
                           model_name, test_size, test_sampling, hyperparams, secrets, credential, priority,
                           max_attempts, status, submitted_by, snapshot_columns, keep_snapshot)
    VALUES (v_job_id, v_project.id, v_model_id, v_task, _submit.relation_name, v_schema, v_table,
            _submit.model_name, _submit.test_size, _submit.test_sampling, v_clean, v_sealed, v_cred,
            _submit.priority, _submit.max_attempts, 'submitting', v_who,
            CASE WHEN v_relname IS NOT NULL THEN v_cols END, coalesce(materialize_snapshot, false));
    -- the job's table (pgml_rows.job_<id>), which pgml.tune fills as its caller
    IF v_relname IS NOT NULL THEN
        PERFORM pgml._job_table_begin(v_job_id);
    END IF;

    RETURN QUERY SELECT v_job_id, v_project.id, v_model_id, v_relname, v_cols;
END $$;

-- pgml._tune_request (INSERT INTO pgml.tune_requests): as in 0008, raised again at its level too (not pinned:
-- it passes the inserter's search_path on)
CREATE OR REPLACE FUNCTION pgml._tune_request() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_msg    text;
    v_detail text;
    v_hint   text;
    v_code   text;
BEGIN
    SELECT * INTO r FROM pgml.tune(
        NEW.project_name, NEW.task, NEW.relation_name, NEW.y_column_name, NEW.model_name,
        COALESCE(NEW.hyperparams, '{}'::jsonb), COALESCE(NEW.test_size, 0.25::float8),
        COALESCE(NEW.test_sampling, 'stratified'::text), COALESCE(NEW.automatic_deploy, true),
        COALESCE(NEW.materialize_snapshot, false), COALESCE(NEW.max_attempts, 3),
        COALESCE(NEW.priority, 0), pg_catalog.current_setting('search_path'));
    NEW.job_id := r.job_id;
    NEW.status := r.status;
    NEW.project_id := r.project_id;
    NEW.model_id := r.model_id;
    RETURN NEW;
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

-- The name of a job's table (schema pgml_rows).
CREATE OR REPLACE FUNCTION pgml._job_table(job_id bigint) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'job_' || job_id::text $$;

-- Drops one table if nobody holds a lock on it, at once; false when it is in use (left to a later pass). Any login
-- can hold a lock on a table it sees in pg_class, its own job tables and others' (a reader's open transaction, or
-- pg_relation_size(oid) in one): a drop that waited would let it stall whoever drops (a job's end, pgml.cancel).
-- NOWAIT for the table itself; the tiny lock_timeout bounds the wait for what the drop also locks (its TOAST
-- table, its identity sequence), which such a session can hold as well.
CREATE OR REPLACE FUNCTION pgml._drop_unlocked(schema_name text, table_name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '10ms'
AS $$
BEGIN
    EXECUTE pg_catalog.format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE NOWAIT', schema_name, table_name);
    EXECUTE pg_catalog.format('DROP TABLE %I.%I', schema_name, table_name);
    RETURN true;
EXCEPTION
    WHEN lock_not_available THEN
        RETURN false;
    WHEN undefined_table THEN
        RETURN true;  -- dropped meanwhile
END $$;

-- Drops the tables of these jobs (their end, or their deletion), unless an ended job keeps its snapshot
-- (tune(materialize_snapshot => true); only its deletion drops that one). A table someone holds a lock on (a
-- submitter reading it in an open transaction, or holding it on purpose) is left as it is, at once: the worker's
-- commit of a job's end and pgml.cancel never wait on a user's lock. The workers' periodic pass
-- (pgml._job_tables_sweep) or pgml.gc drops it once it is free, with any other table left behind.
CREATE OR REPLACE FUNCTION pgml._job_tables_drop(job_ids bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    FOR v_name IN
        SELECT c.relname FROM pg_catalog.unnest(job_ids) AS i (id)
        JOIN pg_catalog.pg_class c ON c.relname = pgml._job_table(i.id)
                                  AND c.relnamespace = 'pgml_rows'::regnamespace AND c.relkind = 'r'
        LEFT JOIN pgml.jobs j ON j.id = i.id
        WHERE j.id IS NULL OR j.status IN ('succeeded', 'failed', 'cancelled')
    LOOP
        PERFORM pgml._drop_unlocked('pgml_rows', v_name);
    END LOOP;
END $$;

-- The background pass over what job ends and cancels left behind (a table that was in use then): the tables of
-- ended jobs that nothing keeps, of jobs that are gone, and load_dataset's staging tables of attempts that no longer
-- run. Each one is dropped only if it is free at once (pgml._drop_unlocked); the rest waits for the next pass. Run
-- by every worker about every 10 s (pgml_tuned/worker/daemon.py). Returns the tables dropped. It also forgets the
-- rendezvous secrets of gang attempts that are over (pgml.gang_secrets, 0034).
CREATE OR REPLACE FUNCTION pgml._job_tables_sweep() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_dropped integer := 0;
BEGIN
    FOR r IN
        SELECT 'pgml_rows' AS nsp, c.relname::text AS relname FROM pg_catalog.pg_class c
        LEFT JOIN pgml.jobs j ON j.id = CASE WHEN c.relname ~ '^job_[0-9]{1,18}$'
                                             THEN pg_catalog.substr(c.relname::text, 5)::bigint END
        WHERE c.relnamespace = 'pgml_rows'::regnamespace AND c.relkind = 'r' AND c.relname ~ '^job_[0-9]{1,18}$'
          AND (j.id IS NULL OR (j.status IN ('succeeded', 'failed', 'cancelled') AND NOT j.keep_snapshot))
        UNION ALL
        SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL pg_catalog.regexp_match(c.relname::text,
            '^(?:load|_dataset_load)_([0-9]{1,18})_([0-9]{1,9})(?:_[0-9a-f]{16})?$') AS m (part)
        LEFT JOIN pgml.jobs j ON j.id = m.part[1]::bigint
        WHERE c.relkind = 'r'
          AND ((n.nspname = 'pgml_staging' AND c.relname ~ '^load_')
               OR (n.nspname = 'pgml' AND c.relname ~ '^_dataset_load_[0-9]+_[0-9]+$'))  -- made before 0034
          AND (j.id IS NULL OR j.status <> 'running' OR j.attempt <> m.part[2]::integer)
    LOOP
        IF pgml._drop_unlocked(r.nsp, r.relname) THEN
            v_dropped := v_dropped + 1;
        END IF;
    END LOOP;
    DELETE FROM pgml.gang_secrets s
    WHERE NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = s.job_id AND j.attempt = s.attempt AND j.status = 'running');
    RETURN v_dropped;
END $$;

CREATE OR REPLACE FUNCTION pgml._job_table_ended() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._job_tables_drop(ARRAY[NEW.id]);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgml._job_tables_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._job_tables_drop((SELECT pg_catalog.array_agg(g.id) FROM gone g));
    RETURN NULL;
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
            MESSAGE = format('the job''s rows are %s MB; the limit for %s is %s MB (max_snapshot_bytes)',
                             round(v_bytes / 1e6, 1), v_lim.role, round(v_lim.max_snapshot_bytes / 1e6, 1)),
            HINT = 'train on fewer rows or shorter texts (a view with a WHERE or LIMIT), or ask an administrator to '
                   'raise max_snapshot_bytes (UPDATE pgml.role_limits)';
    END IF;
    SELECT count(*) INTO v_queued FROM pgml.jobs j
    WHERE j.submitted_by = v_who AND (j.status = 'queued' OR (j.status = 'submitting' AND j.id <> _submitted.job_id));
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
    IF v_job.task IN ('text-embedding', 'text-ranking') THEN
        PERFORM pgml._check_retrieval_rows(v_job);
    END IF;
    RETURN v_job.snapshot_rows;
END $$;

-- The NOTICE every call that queues a job raises: the job's id and how to follow it, with its page on the dashboard
-- when an administrator configured its address (ALTER DATABASE ... SET pgml.dashboard_url = 'http://host:8765'; the
-- dashboard opens a job from the fragment #job=<id>). It reads one setting: nothing is queried.
CREATE OR REPLACE FUNCTION pgml._job_queued_notice(job_id bigint, waiting boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_url text := pg_catalog.rtrim(pg_catalog.btrim(pg_catalog.current_setting('pgml.dashboard_url', true)), '/');
BEGIN
    RAISE NOTICE '%', pg_catalog.format('job %s queued: %s', job_id,
        CASE WHEN waiting THEN 'waiting for it (cancelling this statement cancels the job)'
             ELSE pg_catalog.format('follow it with CALL pgml.wait(%s)', job_id) END)
        || CASE WHEN v_url <> '' THEN pg_catalog.format(', or on the dashboard: %s/#job=%s', v_url, job_id) ELSE '' END;
END $$;

-- Follows a job one step: prints its log rows after `after_log` (pgml._log_line, one INFO line each) and the fleet's
-- advice when it differs from `said`, and returns where it is: {"last_log", "advice", "status", "error", "metrics"}.
-- pgml.wait (a procedure that commits between polls) and pgml.tune(..., wait => true) poll with it, as their caller
-- (row-level security: one's own jobs).
CREATE OR REPLACE FUNCTION pgml._job_follow(job_id bigint, after_log bigint, said text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job record;
    v_log record;
    v_last bigint := after_log;
    v_advice text;
BEGIN
    SELECT j.status, j.error, j.metrics INTO v_job FROM pgml.jobs j WHERE j.id = _job_follow.job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', _job_follow.job_id), ERRCODE = 'no_data_found',
            HINT = 'pgml.tune() returns the job id; SELECT id, status FROM pgml.jobs lists your jobs';
    END IF;
    FOR v_log IN SELECT l.id, l.kind, l.logs FROM pgml.logs l WHERE l.job_id = _job_follow.job_id AND l.id > v_last
                 ORDER BY l.id LOOP
        RAISE INFO '%', pgml._log_line(v_log.logs, v_log.kind);
        v_last := v_log.id;
    END LOOP;
    IF v_job.status NOT IN ('succeeded', 'failed', 'cancelled') THEN
        v_advice := pgml._wait_advice(_job_follow.job_id);
        IF v_advice IS NOT NULL AND v_advice IS DISTINCT FROM said THEN
            RAISE INFO '%', v_advice;
        END IF;
    END IF;
    RETURN jsonb_build_object('last_log', v_last, 'advice', v_advice, 'status', v_job.status, 'error', v_job.error,
                              'metrics', v_job.metrics);
END $$;

-- The steps of pgml.tune(..., wait => true) that go through the loopback (pgml._loopback: a session of its own, in
-- which the job commits while the caller's statement still runs, so a worker can take it). The caller reads its
-- relation itself, with its own rights and search_path, and this ships the rows; the loopback's statements act for
-- the caller (pgml._submitter()). One transaction there, from 'submit' to 'queue': the job is never committed
-- half-way (the constraint trigger jobs_submitted_at_commit).
--   submit (args: pgml._submit's arguments)  BEGIN, then pgml._submit; returns its row
--   rows   (args: a JSON array of rows, each an array of texts)  into the job's table (pgml._job_rows_put)
--   queue  (args: {"copied": n})  pgml._submitted, COMMIT: the job is queued
--   abort  ROLLBACK (nothing of the submission stays)
--   cancel pgml.cancel(job_id), committed at once
-- Callable by pgml_user: each step does only what the caller may do itself (pgml._submit, an INSERT into its own
-- job's table, pgml._submitted, pgml.cancel), as that caller.
CREATE OR REPLACE FUNCTION pgml._tune_loopback(step text, job_id bigint DEFAULT NULL, args jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_result jsonb;
BEGIN
    CASE step
    WHEN 'submit' THEN
        PERFORM pgml._loopback('to_jsonb(true)');  -- connected (the loopback's own checks, e.g. dblink installed)
        EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback', 'BEGIN');
        BEGIN
            -- a lock held by the caller's own transaction (a project row it wrote) would stall both sessions
            PERFORM pgml._loopback('to_jsonb(pg_catalog.set_config(''lock_timeout'', ''10s'', true))');
            v_result := pgml._loopback(format(
                '(SELECT to_jsonb(s) FROM pgml._submit(%L, %L, %L, %L, %L, %L::jsonb, %s::float8, %L, %L::boolean, '
                '%L::boolean, %s::integer, %s::integer, %L, %s::oid, %L) s)',
                args ->> 'project_name', args ->> 'task', args ->> 'relation_name', args ->> 'y_column_name',
                args ->> 'model_name', args -> 'hyperparams', coalesce(args ->> 'test_size', 'NULL'),
                args ->> 'test_sampling', args ->> 'automatic_deploy', args ->> 'materialize_snapshot',
                coalesce(args ->> 'max_attempts', 'NULL'), coalesce(args ->> 'priority', 'NULL'),
                args ->> 'caller_search_path', coalesce(args ->> 'rel', 'NULL'), args ->> 'rel_error'));
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pgml._tune_loopback('abort');
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
                MESSAGE = 'pgml.tune(..., wait => true) waited 10 s for a lock its submission needs (the project''s '
                          'row): this transaction, or another session''s open one, holds it',
                HINT = 'COMMIT what this transaction wrote (an earlier pgml.tune of the same project) before calling '
                       'pgml.tune(..., wait => true), or call it without wait and CALL pgml.wait(job_id) after COMMIT';
        WHEN OTHERS OR query_canceled THEN
            PERFORM pgml._tune_loopback('abort');
            RAISE;
        END;
        RETURN v_result;
    WHEN 'rows' THEN
        RETURN pgml._loopback(format('to_jsonb(pgml._job_rows_put(%s, %L::jsonb))', job_id, args));
    WHEN 'queue' THEN
        v_result := pgml._loopback(format('to_jsonb(pgml._submitted(%s, %s))', job_id,
                                          coalesce(args ->> 'copied', 'NULL')));
        EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback', 'COMMIT');
        RETURN v_result;
    WHEN 'abort' THEN
        BEGIN  -- the connection may be gone with its transaction: nothing is left either way
            EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback', 'ROLLBACK');
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
        RETURN NULL;
    WHEN 'cancel' THEN
        RETURN pgml._loopback(format('to_jsonb(pgml.cancel(%s))', job_id));
    ELSE
        RAISE EXCEPTION 'unknown step %', step USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END $$;

-- Rows for a job being submitted through the loopback (pgml.tune(..., wait => true)): appended to its table in the
-- order given (the table's n numbers them), as its submitter's own INSERT would be. Only its submitter's, only while
-- it is 'submitting'; pgml._submitted checks what arrived.
CREATE OR REPLACE FUNCTION pgml._job_rows_put(job_id bigint, rows jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who  name := pgml._submitter();
    v_cols text[];
    v_n    bigint;
BEGIN
    SELECT j.snapshot_columns INTO v_cols FROM pgml.jobs j
    WHERE j.id = _job_rows_put.job_id AND j.submitted_by = v_who AND j.status = 'submitting';
    IF v_cols IS NULL OR pg_catalog.to_regclass(format('pgml_rows.%I', pgml._job_table(_job_rows_put.job_id))) IS NULL
    THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('job %s is not being submitted by %s with a relation', _job_rows_put.job_id, v_who),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    EXECUTE format('INSERT INTO pgml_rows.%I (%s) SELECT %s FROM pg_catalog.jsonb_array_elements($1) '
                   'WITH ORDINALITY AS r (v, i) ORDER BY r.i', pgml._job_table(_job_rows_put.job_id),
                   (SELECT string_agg(format('c%s', i), ', ' ORDER BY i) FROM generate_subscripts(v_cols, 1) i),
                   (SELECT string_agg(format('r.v ->> %s', i - 1), ', ' ORDER BY i) FROM generate_subscripts(v_cols, 1) i))
        USING rows;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
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
    caller_search_path   text DEFAULT pg_catalog.current_setting('search_path'),
    wait                 boolean DEFAULT false
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
    v_cols text;
    v_row record;
    v_chunk jsonb[] := '{}';
    v_bytes bigint := 0;
    v_follow jsonb := '{"last_log": 0}';
    v_start timestamptz;
    v_elapsed double precision;
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
    IF NOT coalesce(tune.wait, false) THEN
        SELECT * INTO s FROM pgml._submit(tune.project_name, tune.task, tune.relation_name, tune.y_column_name,
                                          tune.model_name, tune.hyperparams, tune.test_size, tune.test_sampling,
                                          tune.automatic_deploy, tune.materialize_snapshot, tune.max_attempts,
                                          tune.priority, tune.caller_search_path, v_rel, v_error);
        IF s.relation IS NOT NULL THEN
            v_table := pg_catalog.format('pgml_rows.%I', 'job_' || s.job_id);  -- pgml._job_table: made by pgml._submit
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
        PERFORM pgml._job_queued_notice(s.job_id);
        RETURN QUERY SELECT s.job_id, 'queued'::text, s.project_id, s.model_id;
        RETURN;
    END IF;

    -- wait => true: the job is submitted through the loopback, so that it commits (and a worker can take it) while
    -- this statement runs; the rows are still read here, as the caller
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_transaction_state',
            MESSAGE = pg_catalog.format('pgml.tune(..., wait => true) cannot follow a job in a %s transaction: its '
                                        'snapshot never sees the job move', pg_catalog.upper(
                                            pg_catalog.current_setting('transaction_isolation'))),
            HINT = 'call it in a READ COMMITTED transaction (the default), or call pgml.tune without wait and '
                   'CALL pgml.wait(job_id) after COMMIT';
    END IF;
    SELECT r.* INTO s FROM pg_catalog.jsonb_to_record(pgml._tune_loopback('submit', NULL, pg_catalog.jsonb_build_object(
        'project_name', tune.project_name, 'task', tune.task, 'relation_name', tune.relation_name,
        'y_column_name', tune.y_column_name, 'model_name', tune.model_name, 'hyperparams', tune.hyperparams,
        'test_size', tune.test_size, 'test_sampling', tune.test_sampling, 'automatic_deploy', tune.automatic_deploy,
        'materialize_snapshot', tune.materialize_snapshot, 'max_attempts', tune.max_attempts,
        'priority', tune.priority, 'caller_search_path', tune.caller_search_path, 'rel', v_rel, 'rel_error', v_error)))
        AS r (job_id bigint, project_id bigint, model_id bigint, relation text, columns text[]);
    BEGIN
        IF s.relation IS NOT NULL THEN
            v_cols := (SELECT pg_catalog.string_agg(pg_catalog.format('%I::text', c), ', ' ORDER BY i)
                       FROM pg_catalog.unnest(s.columns) WITH ORDINALITY AS x (c, i));
            v_copied := 0;
            PERFORM pg_catalog.set_config('search_path', coalesce(caller_search_path, '"$user", public'), true);
            FOR v_row IN EXECUTE pg_catalog.format('SELECT pg_catalog.jsonb_build_array(%s) AS r FROM %s', v_cols,
                                                   s.relation) LOOP
                v_chunk := v_chunk || v_row.r;
                v_bytes := v_bytes + pg_catalog.pg_column_size(v_row.r);
                v_copied := v_copied + 1;
                IF v_bytes > 4000000 OR pg_catalog.cardinality(v_chunk) >= 10000 THEN  -- a few MB a statement
                    PERFORM pgml._tune_loopback('rows', s.job_id, pg_catalog.to_jsonb(v_chunk));
                    v_chunk := '{}';
                    v_bytes := 0;
                END IF;
            END LOOP;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
            IF pg_catalog.cardinality(v_chunk) > 0 THEN
                PERFORM pgml._tune_loopback('rows', s.job_id, pg_catalog.to_jsonb(v_chunk));
            END IF;
        END IF;
        PERFORM pgml._tune_loopback('queue', s.job_id, pg_catalog.jsonb_build_object('copied', v_copied));
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pgml._tune_loopback('abort');
        RAISE;
    END;
    PERFORM pgml._job_queued_notice(s.job_id, true);
    v_start := pg_catalog.clock_timestamp();
    BEGIN
        LOOP
            v_follow := pgml._job_follow(s.job_id, (v_follow ->> 'last_log')::bigint, v_follow ->> 'advice');
            EXIT WHEN v_follow ->> 'status' IN ('succeeded', 'failed', 'cancelled');
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
            PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed < 1 THEN 0.02 WHEN v_elapsed < 10 THEN 0.1 ELSE 0.5 END);
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        -- the caller cancelled the statement (or statement_timeout): the job goes with it, as pgml.load_dataset's
        PERFORM pgml._tune_loopback('cancel', s.job_id);
        RAISE;
    END;
    IF v_follow ->> 'status' = 'failed' THEN
        RAISE EXCEPTION USING ERRCODE = 'external_routine_exception',
            MESSAGE = pg_catalog.format('job %s failed: %s', s.job_id, v_follow ->> 'error'),
            HINT = pg_catalog.format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', s.job_id);
    END IF;
    RAISE INFO '%', pgml._job_end_line(s.job_id, v_follow ->> 'status', v_follow -> 'metrics', v_follow ->> 'error');
    RETURN QUERY SELECT s.job_id, v_follow ->> 'status', s.project_id, s.model_id;
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

COMMENT ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                              integer, integer, text, boolean) IS
    'Queue a fine-tuning job (PostgresML API). Returns at once (a NOTICE names the job and how to follow it: '
    'CALL pgml.wait(job_id), SELECT * FROM pgml.jobs, the dashboard); a pgml-tuned worker trains it. With '
    'wait => true it waits for the job to end, printing its log rows as INFO lines, and returns its final status.';

-- ---- hyperparams.resources.nodes: now up to 16 hosts ----------------------------------------------------------
CREATE OR REPLACE FUNCTION pgml._check_resources(hyperparams jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
    k text;
    v jsonb;
    n numeric;
    caps constant jsonb := '{"gpus": 64, "procs": 64, "nodes": 16}';
    example constant text := 'e.g. "resources": {"gpus": 4} (one rank per GPU), {"procs": 2} (CPU ranks), '
                             '{"nodes": 2, "gpus": 8} (8 GPUs on each of 2 workers)';
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
        IF n > (caps ->> k)::numeric THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s = %s is more than the most a job may ask '
                                                 'for (%s)', k, v, caps ->> k), HINT = example;
        END IF;
    END LOOP;
    IF r ? 'gpus' AND r ? 'procs' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'hyperparams.resources gives both gpus and procs', HINT = 'give "gpus" (one rank per GPU) or "procs" (ranks on CPUs), not both';
    END IF;
END $$;

-- (since 0033) What one job may ask of the fleet (hyperparams.resources, already well-formed): never more than the
-- submitter's caps (pgml.role_limits max_gpus, max_procs, max_nodes), and, for a login with limits, never more than
-- one live worker can give — GPUs on one worker (the largest live one's), CPU ranks on one worker (its CPUs): ranks
-- past them would be started on a worker that cannot hold them. With no live worker at all (a fresh install, a fleet
-- being restarted) the job queues and pgml.tune says so (a NOTICE, as before); so does an administrator's job (no row
-- of their own: no limits), which may wait for the worker they are about to start. resources.nodes past the live
-- workers is not refused: a gang forms as workers join (pgml-tuned serve on another host), the NOTICE says it waits,
-- and a gang that does not form fails the job clearly after --gang-seconds; the role's max_nodes bounds it.
CREATE OR REPLACE FUNCTION pgml._resources_allowed(who name, resources jsonb) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lim   pgml.role_limits := pgml._role_limits(who);
    v_gpus  integer := coalesce((resources ->> 'gpus')::integer, 0);
    v_procs integer := (resources ->> 'procs')::integer;  -- NULL: not asked (GPU ranks, or one process)
    v_key   text;
    v_asked integer;
    v_cap   integer;
    v_live  bigint;
    v_most_gpus integer;
    v_most_cpus integer;
BEGIN
    FOREACH v_key IN ARRAY ARRAY['gpus', 'procs', 'nodes'] LOOP
        v_asked := (resources ->> v_key)::integer;
        v_cap := CASE v_key WHEN 'gpus' THEN v_lim.max_gpus WHEN 'procs' THEN v_lim.max_procs ELSE v_lim.max_nodes END;
        IF v_asked OPERATOR(pg_catalog.>) v_cap THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = pg_catalog.format('hyperparams.resources.%s = %s is more than %s may ask for: the limit for %s is %s',
                                            v_key, v_asked, who, v_lim.role, v_cap),
                HINT = pg_catalog.format('ask for %s or fewer, or ask an administrator to raise pgml.role_limits.max_%s '
                                         '(UPDATE pgml.role_limits SET max_%s = ... WHERE role = %L, or a row for %L)',
                                         v_cap, v_key, v_key, v_lim.role, who);
        END IF;
    END LOOP;
    IF v_lim.role IS NULL THEN
        RETURN;  -- an administrator without limits: the NOTICE of pgml._jobs_resources_check says what is missing
    END IF;
    SELECT count(*), max(s.gpus), max(w.cpus)
    INTO v_live, v_most_gpus, v_most_cpus
    FROM pgml.worker_status s JOIN pgml.workers w ON w.id OPERATOR(pg_catalog.=) s.id
    WHERE s.state IN ('live', 'late');
    IF v_live OPERATOR(pg_catalog.=) 0 THEN
        RETURN;  -- no fleet to measure against: queued, with a NOTICE
    END IF;
    IF v_gpus OPERATOR(pg_catalog.>) v_most_gpus THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_resources',
            MESSAGE = pg_catalog.format('hyperparams.resources.gpus = %s is more than the fleet can give: the most GPUs on '
                                        'one live worker is %s (%s live worker%s)', v_gpus, v_most_gpus, v_live,
                                        CASE WHEN v_live OPERATOR(pg_catalog.=) 1 THEN '' ELSE 's' END),
            HINT = pg_catalog.format('ask for %s GPU%s or fewer (or {"nodes": N, "gpus": %s} across workers); '
                                     'SELECT * FROM pgml.worker_status shows the fleet', v_most_gpus,
                                     CASE WHEN v_most_gpus OPERATOR(pg_catalog.=) 1 THEN '' ELSE 's' END,
                                     GREATEST(v_most_gpus, 1));
    END IF;
    IF v_procs OPERATOR(pg_catalog.>) v_most_cpus THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_resources',
            MESSAGE = pg_catalog.format('hyperparams.resources.procs = %s is more than the fleet can give: the most CPUs on '
                                        'one live worker is %s', v_procs, v_most_cpus),
            HINT = pg_catalog.format('ask for %s processes or fewer (one rank per CPU); SELECT * FROM '
                                     'pgml.worker_status shows the fleet', v_most_cpus);
    END IF;
END $$;

-- pgml.tune: resources checked (nothing queued on a bad value, nor past the submitter's caps or, when a fleet is
-- live, past what it can give), a NOTICE when the fleet could not run it now
CREATE OR REPLACE FUNCTION pgml._jobs_resources_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_why text;
BEGIN
    SELECT * INTO r FROM pgml._job_resources(NEW.hyperparams);  -- raises on a bad value
    IF TG_WHEN = 'BEFORE' THEN
        PERFORM pgml._resources_allowed(NEW.submitted_by, NEW.hyperparams -> 'resources');
    END IF;
    IF TG_WHEN = 'AFTER' AND (r.gpus > 0 OR r.nodes > 1) THEN
        v_why := pgml._fleet_shortfall(r.gpus, r.nodes);
        IF v_why IS NOT NULL THEN
            RAISE NOTICE USING MESSAGE = format('job %s is queued, but %s', NEW.id, v_why),
                HINT = CASE WHEN r.nodes > 1 THEN
                    format('it waits until %s workers%s are free at once (pgml-tuned serve on each host); '
                           'SELECT * FROM pgml.worker_status shows the fleet', r.nodes,
                           CASE WHEN r.gpus > 0 THEN format(' with %s GPU%s each', r.gpus,
                                                            CASE WHEN r.gpus = 1 THEN '' ELSE 's' END) ELSE '' END)
                ELSE
                    format('it waits until a worker with %s GPU%s starts (pgml-tuned serve --gpus ...); '
                           'SELECT * FROM pgml.worker_status shows the fleet', r.gpus,
                           CASE WHEN r.gpus = 1 THEN '' ELSE 's' END) END;
        END IF;
    END IF;
    RETURN NEW;
END $$;

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

-- ---- a job being submitted: bounded, and never committed half-way ------------------------------------------
-- pgml.tune's invoker half (it reads the caller's relation with the caller's rights) calls pgml._submit, fills the
-- job's table, and calls pgml._submitted, which checks what arrived and queues the job. Those two stay callable by
-- pgml_user, so each is safe on its own: both count the jobs being submitted against the queue limit, _submitted
-- checks the job's table against the submitter's max_snapshot_bytes and revokes INSERT on it, and the deferred
-- constraint trigger below refuses to commit a job still 'submitting' (whatever was called, or not): rows put in a
-- job's table without _submitted's check never commit. (A size check at every INSERT, a trigger on each job's
-- table, cost a tenth of a small submit's server time: 13 -> 15 ms for 1,000 rows.)

-- A login's limits (pgml.role_limits): its own row, else pgml_user's; an administrator without a row has none.
CREATE OR REPLACE FUNCTION pgml._role_limits(who name) RETURNS pgml.role_limits
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.role_limits;
BEGIN
    SELECT * INTO v FROM pgml.role_limits l WHERE l.role OPERATOR(pg_catalog.=) who;
    IF NOT FOUND AND NOT pg_catalog.pg_has_role(who, 'pgml_admin', 'MEMBER') THEN
        SELECT * INTO v FROM pgml.role_limits l WHERE l.role OPERATOR(pg_catalog.=) 'pgml_user';
    END IF;
    RETURN v;
END $$;

-- At commit (deferred): a job may not stay 'submitting'. pgml._submit defers it again (SET CONSTRAINTS ... DEFERRED)
-- before it inserts the job, so a caller's SET CONSTRAINTS ALL IMMEDIATE refuses only a job it left half-way.
CREATE OR REPLACE FUNCTION pgml._job_submit_ended() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = NEW.id AND j.status = 'submitting') THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = pg_catalog.format('job %s is still being submitted: a job is committed only once '
                                        'pgml._submitted has checked and queued it', NEW.id),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    RETURN NULL;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                   WHERE tgrelid = 'pgml.jobs'::regclass AND tgname = 'jobs_submitted_at_commit') THEN
        CREATE CONSTRAINT TRIGGER jobs_submitted_at_commit AFTER INSERT OR UPDATE OF status ON pgml.jobs
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.status = 'submitting') EXECUTE FUNCTION pgml._job_submit_ended();
    END IF;
END $$;

CREATE OR REPLACE TRIGGER jobs_limits BEFORE INSERT ON pgml.jobs FOR EACH ROW EXECUTE FUNCTION pgml._check_job_limits();

CREATE OR REPLACE TRIGGER tune_requests_insert INSTEAD OF INSERT ON pgml.tune_requests
    FOR EACH ROW EXECUTE FUNCTION pgml._tune_request();

CREATE OR REPLACE TRIGGER jobs_resources_check BEFORE INSERT ON pgml.jobs
    FOR EACH ROW WHEN (NEW.hyperparams ? 'resources') EXECUTE FUNCTION pgml._jobs_resources_check();

CREATE OR REPLACE TRIGGER jobs_resources_notice AFTER INSERT ON pgml.jobs
    FOR EACH ROW WHEN (NEW.hyperparams ? 'resources') EXECUTE FUNCTION pgml._jobs_resources_check();

CREATE OR REPLACE TRIGGER jobs_tables_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_tables_deleted();

CREATE OR REPLACE TRIGGER jobs_table_ended AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status
          AND NOT NEW.keep_snapshot AND NEW.snapshot_columns IS NOT NULL)
    EXECUTE FUNCTION pgml._job_table_ended();
