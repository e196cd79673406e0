-- 0016_predict_batch: predictions over a whole table, as a job. pgml.predict_batch(model, relation, output_table,
-- ...) queues a job of task 'predict_batch' through pgml.tune (the rows are read at submit, in the caller's
-- session, with the caller's rights: key and text). Its child classifies them in batches and COPYs
-- (key, label, score) into pgml.<output_table>, a table pgml_owner owns and the submitter may read (the worker
-- never writes into a user's table: a user's trigger there would run as the worker). Progress, logs, cancel and
-- CALL pgml.wait work as for training.

INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('predict_batch', '{"text_column": "text", "key_column": "id"}', '{text_column}', '{}',
     '{dataset_args,output_table,batch_size,max_length}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

-- Tables pgml-tuned made for users' results (predictions), so that a name is reused only by its owner.
CREATE TABLE IF NOT EXISTS pgml.output_tables (
    name       text PRIMARY KEY,     -- pgml.<name>
    kind       text NOT NULL,        -- 'predictions'
    owner      name NOT NULL,
    job_id     bigint,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE pgml.output_tables ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_outputs ON pgml.output_tables;
CREATE POLICY own_outputs ON pgml.output_tables FOR SELECT
    USING (owner = session_user OR pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER'));

-- May `who` (re)use pgml.<name> for its results? Raises with the reason when not.
CREATE OR REPLACE FUNCTION pgml._check_output_table(p_name text, who name) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.output_tables;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'output_table % is not a plain table name', coalesce(pg_catalog.quote_literal(p_name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'letters, digits and underscores, e.g. imdb_predictions; it is created as pgml.<name>';
    END IF;
    SELECT * INTO v FROM pgml.output_tables o WHERE o.name = p_name;
    IF FOUND AND v.owner <> who AND NOT pg_catalog.pg_has_role(who, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION 'pgml.% holds the results of another user', p_name USING ERRCODE = 'duplicate_table',
            HINT = 'choose another output_table';
    END IF;
    IF NOT FOUND AND pg_catalog.to_regclass(pg_catalog.format('pgml.%I', p_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'pgml.% exists and is not a table of predictions', p_name USING ERRCODE = 'duplicate_table',
            HINT = 'choose another output_table (an existing table is never overwritten)';
    END IF;
END $$;

-- pgml.predict_batch: classify `text_column` of every row of `relation_name` with `model` (a hub id, pgml:<project>,
-- pgml:model:<id> or one of your project names) into pgml.<output_table> (key text, label text, score float8),
-- joined back on `key_column`. Returns the job at once; CALL pgml.wait(job_id) follows it.
CREATE OR REPLACE FUNCTION pgml.predict_batch(
    model              text,
    relation_name      text,
    output_table       text,
    text_column        text DEFAULT 'text',
    key_column         text DEFAULT 'id',
    batch_size         integer DEFAULT 64,
    max_length         integer DEFAULT NULL,
    priority           integer DEFAULT 0,
    caller_search_path text DEFAULT pg_catalog.current_setting('search_path')
) RETURNS TABLE (job_id bigint, status text, output text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
    v_model text := model;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 OR batch_size > 4096 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 4096, not %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_model IS NULL OR pg_catalog.btrim(v_model) = '' THEN
        RAISE EXCEPTION 'predict_batch needs a model' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'a hub id, pgml:<project> (its deployed model), pgml:model:<id>, or one of your project names';
    END IF;
    PERFORM pgml._check_output_table(output_table, session_user);
    SELECT t.job_id INTO v_job FROM pgml.tune(
        output_table, task => 'predict_batch', relation_name => relation_name, model_name => v_model,
        hyperparams => pg_catalog.jsonb_build_object(
            'dataset_args', pg_catalog.jsonb_build_object('text_column', text_column, 'key_column', key_column),
            'output_table', output_table, 'batch_size', batch_size)
            || CASE WHEN max_length IS NULL THEN '{}'::jsonb
                    ELSE pg_catalog.jsonb_build_object('max_length', max_length) END,
        priority => priority, automatic_deploy => false, caller_search_path => caller_search_path) t;
    RETURN QUERY SELECT v_job, 'queued'::text, pg_catalog.format('pgml.%I', output_table);
END $$;

-- The child of a predict_batch job: (re)create its output table at the start of an attempt (restart => true
-- empties it: an attempt's rows replace an earlier attempt's), and let this transaction's COPY into it through.
CREATE OR REPLACE FUNCTION pgml._child_predictions_begin(job_id bigint, ticket text, restart boolean) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v      pgml.jobs := pgml._child_job(_child_predictions_begin.job_id, ticket, true);
    v_name text := v.hyperparams ->> 'output_table';
BEGIN
    IF v.task <> 'predict_batch' THEN
        RAISE EXCEPTION 'job % is not a predict_batch job', v.id USING ERRCODE = 'PGT01';
    END IF;
    PERFORM pgml._check_output_table(v_name, v.submitted_by);
    IF pg_catalog.to_regclass(pg_catalog.format('pgml.%I', v_name)) IS NULL THEN
        EXECUTE pg_catalog.format('CREATE TABLE pgml.%I (key text, label text, score double precision)', v_name);
        EXECUTE pg_catalog.format('CREATE TRIGGER output_child_check BEFORE INSERT ON pgml.%I '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION pgml._output_insert_check()', v_name);
        EXECUTE pg_catalog.format('REVOKE ALL ON pgml.%I FROM PUBLIC', v_name);
        EXECUTE pg_catalog.format('GRANT INSERT ON pgml.%I TO pgml_child', v_name);
    ELSIF restart THEN
        EXECUTE pg_catalog.format('TRUNCATE pgml.%I', v_name);
    END IF;
    EXECUTE pg_catalog.format('GRANT SELECT ON pgml.%I TO %I', v_name, v.submitted_by);
    INSERT INTO pgml.output_tables (name, kind, owner, job_id) VALUES (v_name, 'predictions', v.submitted_by, v.id)
    ON CONFLICT (name) DO UPDATE SET job_id = EXCLUDED.job_id, created_at = pg_catalog.clock_timestamp();
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_name;  -- the table pgml.<v_name>
END $$;

-- BEFORE INSERT (per statement: one check per COPY) on every output table: only the running job whose table it
-- is, through the ticket its _child_predictions_begin verified in this transaction.
CREATE OR REPLACE FUNCTION pgml._output_insert_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v     pgml.jobs;
    v_job text := pg_catalog.current_setting('pgml.child_job', true);
BEGIN
    IF pg_catalog.pg_has_role(session_user, 'pgml_owner', 'MEMBER') THEN
        RETURN NULL;
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' THEN
        RAISE EXCEPTION 'pgml.%: no child ticket in this transaction', TG_TABLE_NAME USING ERRCODE = 'PGT01';
    END IF;
    v := pgml._child_job(v_job::bigint, pg_catalog.current_setting('pgml.child_ticket', true));
    IF v.hyperparams ->> 'output_table' IS DISTINCT FROM TG_TABLE_NAME THEN
        RAISE EXCEPTION 'job % may write its own output table only, not pgml.%', v.id, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END $$;

-- A project serves its deployed model: the child's pgml:<project> too (0010 took the latest successful one).
CREATE OR REPLACE FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text)
RETURNS TABLE (id bigint, status text, base_model text, task text, project_name text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name := (pgml._child_job(_child_find_model.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_child_find_model.model_id IS NOT NULL AND m.id = _child_find_model.model_id)
           OR (_child_find_model.model_id IS NULL AND p.name = project AND m.status = 'successful'
               AND p.task IN ('text-classification', 'text-pair-classification', 'conversation')))
      AND pgml._may_read_model(m.owner, v_owner)
    ORDER BY (p.owner = v_owner) DESC, (m.id = pgml.deployed_model(p.id)) DESC, m.id DESC
    LIMIT 1;
END $$;

-- Only tasks that make models deploy them.
CREATE OR REPLACE FUNCTION pgml._job_succeeded_deploy() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(NEW.automatic_deploy, true)
       AND NEW.task IN ('text-classification', 'text-pair-classification', 'conversation') THEN
        PERFORM pgml._auto_deploy(NEW.model_id);
    END IF;
    RETURN NULL;
END $$;

SELECT pgml._own_everything();
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
GRANT SELECT ON pgml.output_tables TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.predict_batch(text, text, text, text, text, integer, integer, integer, text),
    pgml._check_output_table(text, name) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml._child_predictions_begin(bigint, text, boolean),
    pgml._child_find_model(bigint, text, bigint, text) TO pgml_child;

INSERT INTO pgml.schema_migrations (version) VALUES ('0016_predict_batch') ON CONFLICT DO NOTHING;
