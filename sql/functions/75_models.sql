-- Models after training: deployment (automatic and pgml.deploy), the deployed model of a project,
-- pgml.predict_batch.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

CREATE OR REPLACE VIEW pgml.files WITH (security_barrier) AS
SELECT f.id, f.model_id, f.path, f.part, f.data
FROM pgml.file_parts f
WHERE EXISTS (SELECT 1 FROM pgml.models m
              WHERE m.id = f.model_id
                AND (m.owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                     OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')));

-- The key metric of a model for deployment decisions: (value, higher_is_better), NULL when it has none. Retrieval
-- models (0040) compare by NDCG@10 on their held-out queries.
CREATE OR REPLACE FUNCTION pgml._key_metric(metrics jsonb, task text, OUT value double precision, OUT higher boolean)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN task IN ('conversation', 'text-generation') THEN (metrics ->> 'eval_loss')::double precision
                WHEN task IN ('text-embedding', 'text-ranking') THEN (metrics ->> 'eval_ndcg@10')::double precision
                ELSE coalesce((metrics ->> 'eval_accuracy')::double precision,
                              (metrics ->> 'eval_f1')::double precision) END,
           task NOT IN ('conversation', 'text-generation')
$$;

-- The model a project serves now, for the functions of the schema (not granted: it answers for any project).
CREATE OR REPLACE FUNCTION pgml._deployed_model(p_project_id bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d.model_id FROM pgml.deployments d WHERE d.project_id = p_project_id ORDER BY d.id DESC LIMIT 1
$$;

-- The same for a caller: only a project it may see (as row-level security on pgml.projects: its owner, an
-- administrator, a worker); anyone else's, like one that does not exist, is NULL.
CREATE OR REPLACE FUNCTION pgml.deployed_model(p_project_id bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._deployed_model(p.id) FROM pgml.projects p
    WHERE p.id = p_project_id
      AND (p.owner = pgml._submitter() OR pg_catalog.pg_has_role(pgml._submitter(), 'pgml_admin', 'MEMBER')
           OR pg_catalog.pg_has_role(session_user, 'pgml_worker', 'MEMBER'))
$$;

-- After a model's job succeeded: deploy it when the rule says so.
CREATE OR REPLACE FUNCTION pgml._auto_deploy(p_model_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_model   pgml.models;
    v_current pgml.models;
    v_new     record;
    v_old     record;
BEGIN
    SELECT * INTO v_model FROM pgml.models WHERE id = p_model_id AND status = 'successful';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT * INTO v_current FROM pgml.models WHERE id = pgml._deployed_model(v_model.project_id);
    IF v_current.id IS NOT NULL THEN
        SELECT * INTO v_new FROM pgml._key_metric(v_model.metrics, v_model.task);
        SELECT * INTO v_old FROM pgml._key_metric(v_current.metrics, v_current.task);
        IF v_new.value IS NULL THEN
            RETURN false;
        END IF;
        IF v_old.value IS NOT NULL AND NOT (CASE WHEN v_new.higher THEN v_new.value > v_old.value
                                                 ELSE v_new.value < v_old.value END) THEN
            RETURN false;
        END IF;
    END IF;
    INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
    VALUES (v_model.project_id, v_model.id, 'automatic', v_model.owner);
    PERFORM pg_catalog.pg_notify('pgml_deployments', '{"type": "deployed"}');  -- naming nothing (issue 20)
    RETURN true;
END $$;

-- pgml.deploy(project, model_id): serve that model (one of the project's successful models).
-- pgml.deploy(project, strategy): 'best_score', 'most_recent' or 'rollback' (the deployment before this one).
CREATE OR REPLACE FUNCTION pgml.deploy(project_name text, model_id bigint)
RETURNS TABLE (project text, rule text, deployed_model_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_project pgml.projects;
    v_model   pgml.models;
    v_who     name := pgml._submitter();
BEGIN
    v_project := pgml._own_project(deploy.project_name, v_who);
    SELECT * INTO v_model FROM pgml.models m WHERE m.id = deploy.model_id AND m.project_id = v_project.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'project % has no model %', deploy.project_name, deploy.model_id
            USING ERRCODE = 'no_data_found',
                  HINT = format('SELECT id, status, metrics FROM pgml.models WHERE project_id = %s lists them',
                                v_project.id);
    END IF;
    IF v_model.status <> 'successful' THEN
        RAISE EXCEPTION 'model % is %, only a successful model can be deployed', v_model.id, v_model.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
    VALUES (v_project.id, v_model.id, 'model_id', v_who);
    PERFORM pg_catalog.pg_notify('pgml_deployments', '{"type": "deployed"}');  -- naming nothing (issue 20)
    RETURN QUERY SELECT v_project.name, 'model_id'::text, v_model.id;
END $$;

CREATE OR REPLACE FUNCTION pgml.deploy(project_name text, strategy text DEFAULT 'best_score')
RETURNS TABLE (project text, rule text, deployed_model_id bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_project pgml.projects;
    v_model   bigint;
    v_who     name := pgml._submitter();
BEGIN
    v_project := pgml._own_project(deploy.project_name, v_who);
    IF deploy.strategy = 'most_recent' THEN
        SELECT m.id INTO v_model FROM pgml.models m
        WHERE m.project_id = v_project.id AND m.status = 'successful' ORDER BY m.id DESC LIMIT 1;
    ELSIF deploy.strategy = 'best_score' THEN
        SELECT m.id INTO v_model FROM pgml.models m, pgml._key_metric(m.metrics, m.task) k
        WHERE m.project_id = v_project.id AND m.status = 'successful' AND k.value IS NOT NULL
        ORDER BY CASE WHEN k.higher THEN -k.value ELSE k.value END, m.id DESC LIMIT 1;
    ELSIF deploy.strategy = 'rollback' THEN
        SELECT d.model_id INTO v_model FROM pgml.deployments d
        WHERE d.project_id = v_project.id AND d.model_id IS DISTINCT FROM pgml._deployed_model(v_project.id)
        ORDER BY d.id DESC LIMIT 1;
    ELSE
        RAISE EXCEPTION 'unknown deployment strategy %', pg_catalog.quote_literal(deploy.strategy)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'use best_score, most_recent or rollback, or pgml.deploy(project_name, model_id)';
    END IF;
    IF v_model IS NULL THEN
        RAISE EXCEPTION 'project % has no model that % can deploy', deploy.project_name, deploy.strategy
            USING ERRCODE = 'no_data_found',
                  HINT = 'a model can be deployed once its job succeeded (and, for best_score, has metrics)';
    END IF;
    INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
    VALUES (v_project.id, v_model, deploy.strategy, v_who);
    PERFORM pg_catalog.pg_notify('pgml_deployments', '{"type": "deployed"}');  -- naming nothing (issue 20)
    RETURN QUERY SELECT v_project.name, deploy.strategy, v_model;
END $$;

-- A project by name as `who` sees it: their own (an administrator's own first, else anyone's of that name).
CREATE OR REPLACE FUNCTION pgml._own_project(p_name text, who name) RETURNS pgml.projects
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.projects;
BEGIN
    SELECT * INTO v FROM pgml.projects p
    WHERE p.name = p_name AND (p.owner = who OR pg_catalog.pg_has_role(who, 'pgml_admin', 'MEMBER'))
    ORDER BY (p.owner = who) DESC, p.id LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no project %', pg_catalog.quote_literal(p_name) USING ERRCODE = 'no_data_found',
            HINT = 'SELECT name FROM pgml.projects lists yours';
    END IF;
    RETURN v;
END $$;

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
    -- output_table is checked by pgml._submit (task predict_batch), where pgml_user's rights do not reach
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

-- (since 0041) pgml.embed_batch: the vectors of `text_column` of every row of `relation_name` by `transformer` (as
-- pgml.embed's: kwargs normalize, prompt, prompt_name, truncate_dim) into pgml.<output_table> (key text, embedding
-- real[]), joined back on `key_column`: pgml.predict_batch's job (rows read at submit with the caller's rights, the
-- child COPYs batch by batch). Returns the job at once; CALL pgml.wait(job_id) follows it.
CREATE OR REPLACE FUNCTION pgml.embed_batch(
    transformer        text,
    relation_name      text,
    output_table       text,
    text_column        text DEFAULT 'text',
    key_column         text DEFAULT 'id',
    kwargs             jsonb DEFAULT '{}',
    batch_size         integer DEFAULT 64,
    priority           integer DEFAULT 0,
    caller_search_path text DEFAULT pg_catalog.current_setting('search_path')
) RETURNS TABLE (job_id bigint, status text, output text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job   bigint;
    v_model text := pg_catalog.btrim(transformer);
BEGIN
    IF batch_size IS NULL OR batch_size < 1 OR batch_size > 4096 THEN
        RAISE EXCEPTION 'batch_size must be between 1 and 4096, not %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. batch_size => 64';
    END IF;
    PERFORM pgml._retrieval_call('embed_batch', transformer, kwargs);
    v_model := pgml._own_project_ref(v_model, session_user);  -- as pgml.embed takes it (pgml._request_submit)
    -- output_table is checked by pgml._submit (task embed_batch), where pgml_user's rights do not reach
    SELECT t.job_id INTO v_job FROM pgml.tune(
        output_table, task => 'embed_batch', relation_name => relation_name, model_name => v_model,
        hyperparams => pg_catalog.jsonb_build_object(
            'dataset_args', pg_catalog.jsonb_build_object('text_column', text_column, 'key_column', key_column),
            'output_table', output_table, 'batch_size', batch_size, 'kwargs', kwargs),
        priority => priority, automatic_deploy => false, caller_search_path => caller_search_path) t;
    RETURN QUERY SELECT v_job, 'queued'::text, pg_catalog.format('pgml.%I', output_table);
END $$;

-- Only tasks that make models deploy them.
CREATE OR REPLACE FUNCTION pgml._job_succeeded_deploy() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(NEW.automatic_deploy, true)
       AND NEW.task IN ('text-classification', 'text-pair-classification', 'conversation', 'text-embedding',
                        'text-ranking') THEN
        PERFORM pgml._auto_deploy(NEW.model_id);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER jobs_succeeded_deploy AFTER UPDATE OF status ON pgml.jobs
    FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded')
    EXECUTE FUNCTION pgml._job_succeeded_deploy();
