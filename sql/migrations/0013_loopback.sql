-- 0013_loopback: calls that must answer synchronously (pgml.transform, pgml.load_dataset) need a request that
-- the worker can see before the caller's transaction commits. They submit it through an autonomous loopback
-- connection (dblink) and then wait for the worker's answer (READ COMMITTED sees its commit).
--
-- The loopback logs in as a login of its own (one per database: pgml_loopback_<database oid>) whose random
-- password lives in pgml.loopback_login, a table only pgml_owner may read: no user's password is stored, and no
-- user can read this one. dblink is installed (when the migrating role may) in schema pgml_dblink, which only
-- pgml_owner may use, so users cannot reach the loopback connection their session holds. Where dblink was
-- installed elsewhere beforehand, the connection is still safe to share: nothing secret crosses it. Every
-- statement carries a proof, sha256(secret : user : remote backend pid : nonce), that the loopback's side
-- checks (pgml._submitter()); a proof names the session's own user and the loopback backend it was made
-- for, so it lets nobody act as anyone else.
--
-- On a server that does not ask the loopback for a password (trust), dblink refuses non-superusers unless
-- they may call dblink_connect_u: a superuser's migration grants that to pgml_owner (alone).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'dblink') THEN
        BEGIN
            CREATE SCHEMA IF NOT EXISTS pgml_dblink;
            REVOKE ALL ON SCHEMA pgml_dblink FROM PUBLIC;
            CREATE EXTENSION dblink SCHEMA pgml_dblink;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'dblink could not be installed (%): pgml.transform and pgml.load_dataset need it; '
                         'ask an administrator to run CREATE EXTENSION dblink, then pgml-tuned migrate again',
                         SQLERRM;
        END;
    END IF;
END $$;

DO $$
BEGIN
    CREATE ROLE pgml_loopback NOLOGIN;  -- the group of every database's loopback login
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END $$;

CREATE TABLE IF NOT EXISTS pgml.loopback_login (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),  -- one row
    login     name NOT NULL,
    password  text NOT NULL,
    secret    text NOT NULL,
    conninfo  text NOT NULL,   -- host and port of this server as seen from itself (an administrator may change it)
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
REVOKE ALL ON pgml.loopback_login FROM PUBLIC;

-- Where dblink lives (NULL: not installed) and whether the loopback may skip dblink's password check.
CREATE OR REPLACE FUNCTION pgml._dblink_schema() RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'dblink'
$$;

-- (Re)creates this database's loopback login. Run by the migration; an administrator runs it again after
-- moving the server (SELECT pgml._setup_loopback('host=... port=...')).
CREATE OR REPLACE FUNCTION pgml._setup_loopback(p_conninfo text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema   name := pgml._dblink_schema();
    v_login    name := 'pgml_loopback_' || (SELECT d.oid FROM pg_catalog.pg_database d
                                            WHERE d.datname = pg_catalog.current_database());
    v_password text := pg_catalog.replace(pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text,
                                          '-', '');
    v_secret   text := pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
                           pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, 'UTF8')), 'hex');
    v_socket   text;
    v_conninfo text;
BEGIN
    BEGIN  -- reading it needs pg_read_all_settings (managed servers: loop back over TCP to localhost)
        v_socket := pg_catalog.split_part(pg_catalog.current_setting('unix_socket_directories'), ',', 1);
    EXCEPTION WHEN insufficient_privilege THEN
        v_socket := NULL;
    END;
    v_conninfo := coalesce(p_conninfo, format('host=%s port=%s',
        CASE WHEN pg_catalog.btrim(coalesce(v_socket, '')) <> '' THEN pg_catalog.btrim(v_socket) ELSE 'localhost' END,
        pg_catalog.current_setting('port')));
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_login) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', v_login);
    END IF;
    EXECUTE format('GRANT pgml_loopback TO %I', v_login);  -- what the loopback may call is granted to the group
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L CONNECTION LIMIT -1', v_login, v_password);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', pg_catalog.current_database(), v_login);
    EXECUTE format('GRANT USAGE ON SCHEMA pgml TO %I', v_login);
    INSERT INTO pgml.loopback_login (login, password, secret, conninfo) VALUES (v_login, v_password, v_secret, v_conninfo)
    ON CONFLICT (id) DO UPDATE SET login = EXCLUDED.login, password = EXCLUDED.password, secret = EXCLUDED.secret,
                                   conninfo = EXCLUDED.conninfo, created_at = pg_catalog.clock_timestamp();
    IF v_schema IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pgml_owner', v_schema);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.dblink(text, text), %1$I.dblink_connect(text, text), '
                       '%1$I.dblink_disconnect(text), %1$I.dblink_get_connections() TO pgml_owner', v_schema);
        IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
            -- trust servers: the loopback need not send a password, which dblink_connect refuses to non-superusers
            EXECUTE format('GRANT EXECUTE ON FUNCTION %I.dblink_connect_u(text, text) TO pgml_owner', v_schema);
        END IF;
    END IF;
    RETURN v_login;
END $$;
REVOKE ALL ON FUNCTION pgml._setup_loopback(text) FROM PUBLIC;
SELECT pgml._setup_loopback();

-- Who is calling: session_user, or for a statement that arrived through the loopback, the user whose session
-- sent it (proved by pgml._loopback_proof; anything else through the loopback is refused).
CREATE OR REPLACE FUNCTION pgml._submitter() RETURNS name
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lb    pgml.loopback_login;
    v_user  text := pg_catalog.current_setting('pgml.on_behalf_of', true);
    v_proof text := pg_catalog.current_setting('pgml.loopback_proof', true);
BEGIN
    SELECT * INTO v_lb FROM pgml.loopback_login;
    IF v_lb.login IS NULL OR session_user <> v_lb.login THEN
        RETURN session_user;
    END IF;
    IF coalesce(v_user, '') = '' OR coalesce(v_proof, '') = ''
       OR pg_catalog.split_part(v_proof, ':', 2) <> pgml._loopback_proof(v_lb.secret, v_user, pg_catalog.pg_backend_pid(),
                                                                          pg_catalog.split_part(v_proof, ':', 1)) THEN
        RAISE EXCEPTION 'a loopback statement without a valid proof' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN v_user::name;
END $$;

CREATE OR REPLACE FUNCTION pgml._loopback_proof(secret text, who text, pid integer, nonce text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
        secret || ':' || who || ':' || pid::text || ':' || nonce, 'UTF8')), 'hex')
$$;
REVOKE ALL ON FUNCTION pgml._loopback_proof(text, text, integer, text) FROM PUBLIC;

-- Runs `stmt` (an expression whose value is jsonb) through this session's loopback, as the calling user, and
-- returns its value. The connection stays open for the session (0.2–0.6 ms a statement instead of 2–3 ms a
-- connect); one that broke (server restart, idle timeout) is opened again once.
CREATE OR REPLACE FUNCTION pgml._loopback(stmt text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_lb     pgml.loopback_login;
    v_pid    integer;
    v_nonce  text;
    v_sql    text;
    v_result text;
    v_try    integer := 0;
BEGIN
    IF v_schema IS NULL THEN
        RAISE EXCEPTION 'this call needs the dblink extension, which is not installed in database %',
            pg_catalog.current_database()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'an administrator runs CREATE EXTENSION dblink (a contrib module every major managed '
                         'PostgreSQL offers), then pgml-tuned migrate; or use the asynchronous form: '
                         'SELECT pgml.load_dataset_async(...) and CALL pgml.wait(job_id)';
    END IF;
    SELECT * INTO v_lb FROM pgml.loopback_login;
    LOOP
        v_try := v_try + 1;
        v_pid := nullif(pg_catalog.current_setting('pgml.loopback_pid', true), '')::integer;
        IF v_pid IS NULL OR NOT EXISTS (
                SELECT 1 FROM pg_catalog.unnest(pgml._dblink_connections(v_schema)) c WHERE c = 'pgml_loopback') THEN
            v_pid := pgml._loopback_connect(v_schema, v_lb);
        END IF;
        v_nonce := pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
        -- one statement: the proof is set (in the subquery, evaluated first) for the expression that follows
        v_sql := format('SELECT (%3$s)::text FROM (SELECT pg_catalog.set_config(''pgml.on_behalf_of'', %1$L, true), '
                        'pg_catalog.set_config(''pgml.loopback_proof'', %2$L, true) OFFSET 0) AS proof',
                        session_user, v_nonce || ':' || pgml._loopback_proof(v_lb.secret, session_user, v_pid, v_nonce),
                        stmt);
        BEGIN
            EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback', v_sql)
                INTO v_result;
            RETURN v_result::jsonb;
        EXCEPTION WHEN connection_exception OR sqlclient_unable_to_establish_sqlconnection OR admin_shutdown
                       OR crash_shutdown OR insufficient_privilege THEN
            -- a broken connection, or one that is not ours (opened by someone else under this name)
            IF v_try > 1 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.set_config('pgml.loopback_pid', '', false);
            BEGIN
                EXECUTE format('SELECT %I.dblink_disconnect(%L)', v_schema, 'pgml_loopback');
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
        END;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgml._dblink_connections(v_schema name) RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text[];
BEGIN
    EXECUTE format('SELECT %I.dblink_get_connections()', v_schema) INTO v;
    RETURN coalesce(v, '{}');
END $$;

CREATE OR REPLACE FUNCTION pgml._loopback_connect(v_schema name, v_lb pgml.loopback_login) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_connstr text := format('%s dbname=%s user=%s password=%s application_name=pgml_loopback',
                             v_lb.conninfo, pgml._conn_quote(pg_catalog.current_database()),
                             pgml._conn_quote(v_lb.login), pgml._conn_quote(v_lb.password));
    v_pid integer;
BEGIN
    IF pgml._dblink_connections(v_schema) @> ARRAY['pgml_loopback'] THEN
        EXECUTE format('SELECT %I.dblink_disconnect(%L)', v_schema, 'pgml_loopback');
    END IF;
    IF pg_catalog.has_function_privilege(format('%I.dblink_connect_u(text, text)', v_schema), 'EXECUTE') THEN
        EXECUTE format('SELECT %I.dblink_connect_u(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
    ELSE
        EXECUTE format('SELECT %I.dblink_connect(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
    END IF;
    EXECUTE format('SELECT t.p FROM %I.dblink(%L, %L) AS t(p integer)', v_schema, 'pgml_loopback',
                   'SELECT pg_catalog.pg_backend_pid()') INTO v_pid;
    PERFORM pg_catalog.set_config('pgml.loopback_pid', v_pid::text, false);
    RETURN v_pid;
END $$;

CREATE OR REPLACE FUNCTION pgml._conn_quote(v text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '''' || pg_catalog.replace(pg_catalog.replace(v, '\', '\\'), '''', '\''') || ''''
$$;

-- ---- deployments --------------------------------------------------------------------------------------------
-- What a project serves (pgml:<project>): its deployed model. PostgresML's rule: a new successful model is
-- deployed automatically (unless its job said automatic_deploy => false) when its key metric beats the deployed
-- one's (eval_accuracy, else eval_f1, higher is better; eval_loss for conversation, lower is better), or when
-- nothing is deployed yet. pgml.deploy(project, model_id) chooses by hand.
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS automatic_deploy boolean NOT NULL DEFAULT true;

CREATE TABLE IF NOT EXISTS pgml.deployments (
    id         bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    model_id   bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    strategy   text NOT NULL DEFAULT 'manual',  -- 'automatic', 'model_id', 'best_score', 'most_recent', 'rollback'
    deployed_by name NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS deployments_project_idx ON pgml.deployments (project_id, id DESC);
ALTER TABLE pgml.deployments ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_deployments ON pgml.deployments;
CREATE POLICY own_deployments ON pgml.deployments FOR SELECT
    USING (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = project_id
                   AND (p.owner = session_user OR pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER'))));

-- The key metric of a model for deployment decisions: (value, higher_is_better), NULL when it has none.
CREATE OR REPLACE FUNCTION pgml._key_metric(metrics jsonb, task text, OUT value double precision, OUT higher boolean)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN task IN ('conversation', 'text-generation') THEN (metrics ->> 'eval_loss')::double precision
                ELSE coalesce((metrics ->> 'eval_accuracy')::double precision,
                              (metrics ->> 'eval_f1')::double precision) END,
           task NOT IN ('conversation', 'text-generation')
$$;

CREATE OR REPLACE FUNCTION pgml.deployed_model(p_project_id bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d.model_id FROM pgml.deployments d WHERE d.project_id = p_project_id ORDER BY d.id DESC LIMIT 1
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
    SELECT * INTO v_current FROM pgml.models WHERE id = pgml.deployed_model(v_model.project_id);
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
    PERFORM pg_catalog.pg_notify('pgml_deployments', json_build_object('type', 'deployed', 'project_id',
                                 v_model.project_id, 'model_id', v_model.id)::text);
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION pgml._job_succeeded_deploy() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(NEW.automatic_deploy, true) THEN
        PERFORM pgml._auto_deploy(NEW.model_id);
    END IF;
    RETURN NULL;
END $$;
-- named to fire after jobs_changed (AFTER triggers run in name order), which marks the model successful
DROP TRIGGER IF EXISTS jobs_succeeded_deploy ON pgml.jobs;
CREATE TRIGGER jobs_succeeded_deploy AFTER UPDATE OF status ON pgml.jobs
    FOR EACH ROW WHEN (NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded')
    EXECUTE FUNCTION pgml._job_succeeded_deploy();

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
    PERFORM pg_catalog.pg_notify('pgml_deployments', json_build_object('type', 'deployed', 'project_id',
                                 v_project.id, 'model_id', v_model.id)::text);
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
        WHERE d.project_id = v_project.id AND d.model_id IS DISTINCT FROM pgml.deployed_model(v_project.id)
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
    PERFORM pg_catalog.pg_notify('pgml_deployments', json_build_object('type', 'deployed', 'project_id',
                                 v_project.id, 'model_id', v_model)::text);
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

-- Existing projects: their best model so far is what they serve.
INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
SELECT DISTINCT ON (m.project_id) m.project_id, m.id, 'automatic', m.owner
FROM pgml.models m LEFT JOIN LATERAL pgml._key_metric(m.metrics, m.task) k ON true
WHERE m.status = 'successful' AND NOT EXISTS (SELECT 1 FROM pgml.deployments d WHERE d.project_id = m.project_id)
ORDER BY m.project_id, CASE WHEN k.higher THEN -k.value ELSE k.value END NULLS LAST, m.id DESC;

SELECT pgml._own_everything();
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
GRANT SELECT ON pgml.deployments TO pgml_user, pgml_worker;
GRANT EXECUTE ON FUNCTION pgml.deploy(text, bigint), pgml.deploy(text, text), pgml.deployed_model(bigint)
    TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.deployed_model(bigint) TO pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0013_loopback') ON CONFLICT DO NOTHING;
