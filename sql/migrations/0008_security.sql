-- 0008_security: who may do what. Roles, the API running as its owner, row-level security, and the rows a
-- job trains on read at submit time in the caller's session with the caller's rights (the worker never reads
-- a user's relation, so it never runs a user's code). Plain SQL, idempotent, runnable with psql by an
-- administrator (a superuser, or a role with CREATEROLE that may create in this database).
--
-- Roles (cluster-wide, NOLOGIN; grant them to logins):
--   pgml_owner   owns schema pgml and everything in it; the API's SECURITY DEFINER functions run as it
--   pgml_user    may fine-tune: GRANT pgml_user TO alice;   sees and acts on its own jobs, models, logs, files
--   pgml_worker  the daemons' login: GRANT pgml_worker TO worker;   reads and writes the queue, never a
--                user's relation; not an owner, never a superuser
--   pgml_admin   every job, priority above 0, diagnostic tasks: GRANT pgml_admin TO ops;   (a pgml_user too)

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgml_owner', 'pgml_user', 'pgml_worker', 'pgml_admin'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this cluster (or a concurrent migration) created it
        END;
    END LOOP;
END $$;
GRANT pgml_user TO pgml_admin;
DO $$
BEGIN
    -- the migrating role hands every object to pgml_owner, which needs it to be a member (a superuser is).
    -- PostgreSQL 16+: a CREATEROLE role that created pgml_owner holds it with ADMIN only (no SET), which is not
    -- enough to give it objects: ask for SET (and INHERIT) explicitly.
    IF pg_catalog.current_setting('server_version_num')::int >= 160000 THEN
        IF NOT pg_has_role(current_user, 'pgml_owner', 'SET') THEN
            EXECUTE format('GRANT pgml_owner TO %I WITH SET TRUE, INHERIT TRUE', current_user);
        END IF;
    ELSIF NOT pg_has_role(current_user, 'pgml_owner', 'MEMBER') THEN
        EXECUTE format('GRANT pgml_owner TO %I', current_user);
    END IF;
END $$;

-- ---- new columns ----------------------------------------------------------------------------------------
ALTER TABLE pgml.projects ADD COLUMN IF NOT EXISTS owner name NOT NULL DEFAULT session_user;
ALTER TABLE pgml.projects DROP CONSTRAINT IF EXISTS projects_name_key;
DO $$
BEGIN
    ALTER TABLE pgml.projects ADD CONSTRAINT projects_owner_name_key UNIQUE (owner, name);
EXCEPTION WHEN duplicate_table OR duplicate_object THEN
    NULL;
END $$;
ALTER TABLE pgml.models ADD COLUMN IF NOT EXISTS owner name NOT NULL DEFAULT session_user;
UPDATE pgml.models m SET owner = p.owner FROM pgml.projects p WHERE p.id = m.project_id AND m.owner <> p.owner;

ALTER TABLE pgml.jobs ALTER COLUMN submitted_by SET DEFAULT session_user;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS snapshot_columns text[];  -- the columns copied, in order
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS snapshot_rows bigint;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS keep_snapshot boolean NOT NULL DEFAULT false;
ALTER TABLE pgml.jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE pgml.jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('submitting', 'queued', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE INDEX IF NOT EXISTS jobs_submitting_idx ON pgml.jobs (submitted_by, id) WHERE status = 'submitting';
CREATE INDEX IF NOT EXISTS jobs_running_submitter_idx ON pgml.jobs (submitted_by) WHERE status = 'running';

-- Per-role limits, read at submit time (a login's own row, else pgml_user's; pgml_admin members without a row of
-- their own have none). NULL = no limit. Administrators change them: UPDATE pgml.role_limits SET ... .
CREATE TABLE IF NOT EXISTS pgml.role_limits (
    role                 name PRIMARY KEY,
    max_queued           integer,   -- jobs waiting in the queue at once
    max_running          integer,   -- jobs running at once (a job over it waits in the queue)
    max_snapshot_bytes   bigint,    -- the rows one job copies at submit time
    max_runtime          interval,  -- from a job's first claim; a job over it is stopped and failed
    max_checkpoint_bytes bigint     -- the checkpoints one job keeps in PostgreSQL
);
INSERT INTO pgml.role_limits (role, max_queued, max_running, max_snapshot_bytes, max_runtime, max_checkpoint_bytes)
VALUES ('pgml_user', 100, 4, 2000000000, interval '7 days', 20000000000)
ON CONFLICT (role) DO NOTHING;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_running integer;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_runtime interval;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_checkpoint_bytes bigint;

ALTER TABLE pgml.tasks ADD COLUMN IF NOT EXISTS admin_only boolean NOT NULL DEFAULT false;
UPDATE pgml.tasks SET admin_only = (name = 'noop');

-- The rows a job trains on, copied by pgml.tune() in the caller's transaction with the caller's rights: one
-- consistent snapshot per job. Deleted when the job ends, unless tune(materialize_snapshot => true) kept it.
-- No foreign key and no primary key: a per-row foreign-key check made the copy ~2x slower than the
-- INSERT ... SELECT it is. One index on job_id finds a job's rows; the jobs triggers delete them (job
-- finished, or deleted).
CREATE TABLE IF NOT EXISTS pgml.job_rows (
    job_id bigint NOT NULL,
    n      bigint NOT NULL,
    v      text[] NOT NULL
);
CREATE INDEX IF NOT EXISTS job_rows_job_idx ON pgml.job_rows (job_id);

-- Model files: COPY (the workers' bulk path) cannot write into a table with row-level security, so the parts live
-- in pgml.file_parts, which only the workers and the owner touch; pgml.files is the view users read, showing
-- the files of the models each may read (security_barrier: no function of a user's sees another's rows).
DO $$
BEGIN
    IF to_regclass('pgml.file_parts') IS NULL THEN
        ALTER TABLE pgml.files RENAME TO file_parts;
    END IF;
END $$;
CREATE OR REPLACE VIEW pgml.files WITH (security_barrier) AS
SELECT f.id, f.model_id, f.path, f.part, f.data
FROM pgml.file_parts f
WHERE EXISTS (SELECT 1 FROM pgml.models m
              WHERE m.id = f.model_id
                AND (m.owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                     OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')));

-- ---- triggers run as the owner: a worker's UPDATE records events and moves models without grants of its own
CREATE OR REPLACE FUNCTION pgml._job_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.status = 'submitting' THEN
        RETURN NULL;  -- pgml.tune() is still copying its rows: the job is born when it becomes queued
    END IF;
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.attempt IS DISTINCT FROM OLD.attempt THEN
        INSERT INTO pgml.job_events (job_id, attempt, worker, old_status, new_status, lease_expires_at)
        VALUES (NEW.id, NEW.attempt, NEW.worker,
                CASE WHEN TG_OP = 'UPDATE' AND OLD.status <> 'submitting' THEN OLD.status END,
                NEW.status, NEW.lease_expires_at);
        -- clients LISTEN pgml_job_status to follow jobs without polling
        PERFORM pg_notify('pgml_job_status', json_build_object(
            'id', NEW.id, 'status', NEW.status, 'attempt', NEW.attempt)::text);
    END IF;
    -- workers LISTEN pgml_jobs: a job that becomes queued (submitted, requeued, reaped) wakes one at once
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_notify('pgml_jobs', json_build_object('type', 'job_queued', 'id', NEW.id)::text);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status
       AND NEW.status IN ('succeeded', 'failed', 'cancelled') THEN
        -- the model row follows its job: one place keeps them consistent
        UPDATE pgml.models SET status = CASE NEW.status WHEN 'succeeded' THEN 'successful' ELSE NEW.status END,
                               updated_at = clock_timestamp()
        WHERE id = NEW.model_id;
        -- nothing of a finished job is kept that it no longer needs: its sealed secrets, and (unless
        -- materialize_snapshot) its rows and checkpoints
        UPDATE pgml.jobs SET secrets = NULL WHERE id = NEW.id AND secrets IS NOT NULL;
        IF NOT NEW.keep_snapshot THEN
            DELETE FROM pgml.job_rows WHERE job_id = NEW.id;
            DELETE FROM pgml.checkpoints WHERE job_id = NEW.id;
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- a deleted job's rows go with it (pgml.job_rows has no foreign key, see above)
CREATE OR REPLACE FUNCTION pgml._job_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgml.job_rows r USING gone g WHERE r.job_id = g.id;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS jobs_deleted ON pgml.jobs;
CREATE TRIGGER jobs_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_deleted();

-- ---- the API --------------------------------------------------------------------------------------------
-- The definer half of pgml.tune(): every check SQL can make, then the project, model and job rows (the job
-- 'submitting'), recorded as the session's login (session_user), whatever the caller says. Returns what the
-- invoker half needs to copy the rows: the relation, schema-qualified and quoted, and the columns to copy.
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
    v_admin    boolean := pg_has_role(session_user, 'pgml_admin', 'MEMBER');
    v_relname  text;
BEGIN
    -- project and task
    IF project_name IS NULL OR btrim(project_name) = '' THEN
        PERFORM pgml._fail('project_name is required', 'pass a name, e.g. pgml.tune(''my_project'', ...)');
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name AND p.owner = session_user;
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
    IF v_taskrow.admin_only AND NOT v_admin THEN
        PERFORM pgml._fail(format('task %L is a diagnostic task for administrators', v_task),
                           format('a member of pgml_admin may run it (GRANT pgml_admin TO %I)', session_user),
                           'insufficient_privilege');
    END IF;
    IF priority > 0 AND NOT v_admin THEN
        PERFORM pgml._fail(format('priority %s: a priority above 0 is for administrators', priority),
                           'leave priority out (0), or ask a member of pgml_admin to raise it', 'insufficient_privilege');
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
        IF rel_error IS NOT NULL THEN
            PERFORM pgml._fail(format('relation_name %L is not a valid relation name: %s', relation_name, rel_error),
                               'write schema.table, double-quoting names that need it: ''"My Schema"."My Table"''');
        END IF;
        v_rel := rel;
        IF v_rel IS NULL THEN
            PERFORM pgml._fail(format('relation %L does not exist', relation_name),
                'check the spelling and schema (search_path is ' || coalesce(caller_search_path, '') || ')',
                'undefined_table');
        END IF;
        SELECT c.relkind, n.nspname, c.relname INTO v_relkind, v_schema, v_table
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel;
        IF v_relkind NOT IN ('r', 'v', 'm', 'p', 'f') THEN
            PERFORM pgml._fail(format('%s is not a table or view', v_rel), 'pass a table, view or materialized view');
        END IF;
        IF NOT has_table_privilege(session_user, v_rel, 'SELECT') THEN
            PERFORM pgml._fail(format('permission denied: %s may not SELECT from %s', session_user, v_rel),
                               format('GRANT SELECT ON %s TO %I', v_rel, session_user), 'insufficient_privilege');
        END IF;
        v_relname := format('%I.%I', v_schema, v_table);
        v_dargs := coalesce(v_hp -> 'dataset_args', '{}');
        FOR v_arg, v_col IN SELECT key, value FROM jsonb_each_text(v_taskrow.required_columns) LOOP
            v_col := coalesce(v_dargs ->> v_arg, CASE WHEN v_arg = 'class_column' THEN y_column_name END, v_col);
            IF v_col IS NULL THEN
                PERFORM pgml._fail(format('dataset_args.%s is required for task %s', v_arg, v_task),
                    format('set "dataset_args": {"%s": "<column>"} in hyperparams (or y_column_name)', v_arg));
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

    INSERT INTO pgml.projects AS p (name, task, owner) VALUES (project_name, v_task, session_user)
    ON CONFLICT (owner, name) DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;

    INSERT INTO pgml.models (project_id, task, model_name, relation_name, hyperparams, owner)
    VALUES (v_project.id, v_task, _submit.model_name, _submit.relation_name, v_clean, session_user)
    RETURNING id INTO v_model_id;

    -- 'submitting': invisible to workers until pgml._submitted() has seen the rows arrive
    INSERT INTO pgml.jobs (project_id, model_id, task, relation_name, relation_schema, relation_table, model_name,
                           test_size, test_sampling, hyperparams, secrets, priority, max_attempts, status,
                           submitted_by, snapshot_columns, keep_snapshot)
    VALUES (v_project.id, v_model_id, v_task, _submit.relation_name, v_schema, v_table, _submit.model_name,
            _submit.test_size, _submit.test_sampling, v_clean, v_sealed, _submit.priority, _submit.max_attempts,
            'submitting', session_user, CASE WHEN v_relname IS NOT NULL THEN v_cols END,
            coalesce(materialize_snapshot, false))
    RETURNING id INTO v_job_id;

    RETURN QUERY SELECT v_job_id, v_project.id, v_model_id, v_relname, v_cols;
END $$;


-- The end of a submission: the rows are in; the job is queued (NOTIFY pgml_jobs at commit, by the trigger).
CREATE OR REPLACE FUNCTION pgml._submitted(job_id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job   pgml.jobs;
    v_lim   pgml.role_limits;
    v_bytes bigint;
    v_rows  bigint;
    v_queued bigint;
BEGIN
    SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = session_user;
    IF NOT FOUND AND NOT pg_has_role(session_user, 'pgml_admin', 'MEMBER') THEN
        SELECT * INTO v_lim FROM pgml.role_limits l WHERE l.role = 'pgml_user';
    END IF;
    SELECT count(*), coalesce(sum(pg_column_size(r.v)), 0) INTO v_rows, v_bytes
    FROM pgml.job_rows r WHERE r.job_id = _submitted.job_id;
    IF v_bytes > v_lim.max_snapshot_bytes THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('the job''s rows are %s MB; the limit for %s is %s MB', round(v_bytes / 1e6, 1),
                             v_lim.role, round(v_lim.max_snapshot_bytes / 1e6, 1)),
            HINT = 'train on fewer rows or shorter texts, or ask an administrator (pgml.role_limits)';
    END IF;
    SELECT count(*) INTO v_queued FROM pgml.jobs j WHERE j.submitted_by = session_user AND j.status = 'queued';
    IF v_queued >= v_lim.max_queued THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('%s has %s jobs in the queue; the limit for %s is %s', session_user, v_queued,
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
    WHERE j.id = _submitted.job_id AND j.submitted_by = session_user AND j.status = 'submitting'
    RETURNING * INTO v_job;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('job %s is not being submitted by %s', _submitted.job_id, session_user),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    IF v_job.snapshot_rows < 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s has %s rows; at least 2 are needed (one to train, one to test)',
                             v_job.relation_name, v_job.snapshot_rows),
            HINT = 'check the relation (or view) returns the rows you expect';
    END IF;
    RETURN v_job.snapshot_rows;
END $$;

DROP FUNCTION IF EXISTS pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean, integer,
                                  integer);
-- pgml.tune(): the PostgresML API. It runs as its caller: the rows it copies are read with the caller's rights
-- (a view's functions run as the caller, never as the worker or the owner). The checks and the bookkeeping
-- run as the owner (pgml._submit, pgml._submitted). caller_search_path is evaluated in the caller's session
-- (a default is computed before the function's own pinned search_path applies): the relation name resolves
-- as the caller would resolve it, while nothing in this function can be redirected by it.
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
        EXECUTE format('INSERT INTO pgml.job_rows (job_id, n, v) '
                       'SELECT $1, pg_catalog.row_number() OVER (), ARRAY[%s] FROM %s',
                       (SELECT string_agg(format('%I::text', c), ', ' ORDER BY i)
                        FROM unnest(s.columns) WITH ORDINALITY AS x (c, i)),
                       s.relation)
        USING s.job_id;
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    PERFORM pgml._submitted(s.job_id);
    RETURN QUERY SELECT s.job_id, 'queued'::text, s.project_id, s.model_id;
END $$;

COMMENT ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                              integer, integer, text) IS
    'Queue a fine-tuning job (PostgresML API). Returns at once; a pgml-tuned worker trains it. '
    'Follow it with CALL pgml.wait(job_id) or SELECT * FROM pgml.jobs.';

-- Inserts are calls: INSERT INTO pgml.tune_requests (...) VALUES (...) RETURNING job_id queues exactly as
-- pgml.tune() does (same checks, same snapshot, same submitter), for clients that can only write rows.
CREATE OR REPLACE VIEW pgml.tune_requests AS
SELECT NULL::text AS project_name, NULL::text AS task, NULL::text AS relation_name, NULL::text AS y_column_name,
       NULL::text AS model_name, NULL::jsonb AS hyperparams, NULL::double precision AS test_size,
       NULL::text AS test_sampling, NULL::boolean AS automatic_deploy, NULL::boolean AS materialize_snapshot,
       NULL::integer AS max_attempts, NULL::integer AS priority,
       NULL::bigint AS job_id, NULL::text AS status, NULL::bigint AS project_id, NULL::bigint AS model_id
WHERE false;

-- Runs as the inserting role, like pgml.tune(). Not pinned: it passes the inserter's search_path on to
-- pgml.tune() (every name in it is schema-qualified).
CREATE OR REPLACE FUNCTION pgml._tune_request() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
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
END $$;
DROP TRIGGER IF EXISTS tune_requests_insert ON pgml.tune_requests;
CREATE TRIGGER tune_requests_insert INSTEAD OF INSERT ON pgml.tune_requests
    FOR EACH ROW EXECUTE FUNCTION pgml._tune_request();

-- Cancel a job of one's own (an administrator: any job). Queued: cancelled at once. Running: the request is
-- recorded and the worker woken (NOTIFY pgml_control); it reads the request from the row, stops the process
-- and marks the job cancelled within seconds. Returns the job's status after the call. Another user's job is
-- "no job N", exactly as a job that does not exist.
CREATE OR REPLACE FUNCTION pgml.cancel(job_id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
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
      AND (j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'))
    RETURNING j.status INTO v_status;
    IF v_status = 'running' THEN
        PERFORM pg_notify('pgml_control', json_build_object('type', 'cancel_requested', 'id', cancel.job_id)::text);
        RETURN 'cancelling';
    ELSIF v_status IS NOT NULL THEN
        RETURN v_status;
    END IF;
    SELECT j.status INTO v_status FROM pgml.jobs j WHERE j.id = cancel.job_id
        AND (j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', cancel.job_id), ERRCODE = 'no_data_found',
            HINT = 'SELECT id, status FROM pgml.jobs ORDER BY id DESC lists your jobs';
    END IF;
    RETURN v_status;  -- already succeeded, failed or cancelled
END $$;

-- CALL pgml.wait(job_id): every new log row as an INFO message as it arrives, then the final status and
-- metrics; raises the job's error if it failed. It runs as its caller (row-level security: one's own jobs)
-- and COMMITs between polls, so it never holds a snapshot for hours; a procedure that commits cannot pin its
-- search_path, so every name in it is schema-qualified.
CREATE OR REPLACE PROCEDURE pgml.wait(job_id bigint, poll_seconds real DEFAULT 0.5, timeout_seconds real DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint := 0;
    v_log record;
    v_job record;
    v_start timestamptz := pg_catalog.clock_timestamp();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = wait.job_id) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('no job %s', wait.job_id), ERRCODE = 'no_data_found',
            HINT = 'pgml.tune() returns the job id; SELECT id, status FROM pgml.jobs lists your jobs';
    END IF;
    LOOP
        SELECT j.status, j.error, j.metrics, j.attempt INTO v_job FROM pgml.jobs j WHERE j.id = wait.job_id;
        FOR v_log IN SELECT l.id, l.logs FROM pgml.logs l WHERE l.job_id = wait.job_id AND l.id > v_last
                     ORDER BY l.id LOOP
            RAISE INFO '%', pg_catalog.jsonb_pretty(v_log.logs);
            v_last := v_log.id;
        END LOOP;
        EXIT WHEN v_job.status IN ('succeeded', 'failed', 'cancelled');
        IF timeout_seconds IS NOT NULL
           AND pg_catalog.clock_timestamp() - v_start > pg_catalog.make_interval(secs => timeout_seconds) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s is still %s after %s s', wait.job_id,
                                                              v_job.status, timeout_seconds),
                ERRCODE = 'query_canceled', HINT = 'CALL pgml.wait again to keep following it';
        END IF;
        COMMIT;
        PERFORM pg_catalog.pg_sleep(poll_seconds);
    END LOOP;
    IF v_job.status = 'failed' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s failed: %s', wait.job_id, v_job.error),
            HINT = pg_catalog.format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', wait.job_id);
    END IF;
    RAISE INFO '%', pg_catalog.jsonb_pretty(pg_catalog.jsonb_build_object('job_id', wait.job_id, 'status',
        v_job.status, 'metrics', v_job.metrics, 'error', v_job.error));
END $$;

-- ---- views: what a role may see of the queue ------------------------------------------------------------
-- (They run as their owner on PostgreSQL 14, which has no security_invoker views: the filter is explicit.)
CREATE OR REPLACE VIEW pgml.job_status AS
SELECT j.id,
       p.name AS project,
       j.task,
       j.status,
       j.attempt,
       j.max_attempts,
       j.worker,
       CASE WHEN j.status = 'running' THEN
           round(extract(epoch FROM clock_timestamp() - j.heartbeat_at)::numeric, 1) END AS heartbeat_age,
       (j.progress ->> 'step')::bigint AS step,
       (j.progress ->> 'max_steps')::bigint AS max_steps,
       round(100.0 * (j.progress ->> 'step')::numeric / nullif((j.progress ->> 'max_steps')::numeric, 0), 1)
           AS progress_pct,
       (j.progress ->> 'loss')::float8 AS last_loss,
       CASE WHEN j.status = 'running' AND (j.progress ->> 'steps_per_second')::float8 > 0 THEN
           make_interval(secs => greatest(0, ((j.progress ->> 'max_steps')::float8 - (j.progress ->> 'step')::float8)
                                        / (j.progress ->> 'steps_per_second')::float8)) END AS eta,
       j.cancel_requested,
       j.error,
       j.metrics,
       j.model_id,
       j.created_at,
       j.started_at,
       j.finished_at,
       j.submitted_by
FROM pgml.jobs j
JOIN pgml.projects p ON p.id = j.project_id
WHERE j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
   OR pg_has_role(session_user, 'pgml_worker', 'MEMBER');

CREATE OR REPLACE VIEW pgml.queue_summary AS
SELECT s.status,
       count(j.id) AS jobs,
       count(DISTINCT j.worker) FILTER (WHERE j.status = 'running') AS workers,
       count(*) FILTER (WHERE j.status = 'running' AND j.lease_expires_at < clock_timestamp()) AS expired_leases,
       max(clock_timestamp() - j.created_at) FILTER (WHERE j.status = 'queued') AS oldest_queued_age
FROM (VALUES ('queued'), ('running'), ('succeeded'), ('failed'), ('cancelled')) AS s (status)
LEFT JOIN pgml.jobs j ON j.status = s.status
    AND (j.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER'))
GROUP BY s.status
ORDER BY array_position(ARRAY['queued', 'running', 'succeeded', 'failed', 'cancelled'], s.status);

-- ---- row-level security: users see their own, workers and administrators all --------------------------
ALTER TABLE pgml.projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.models ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.job_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.job_rows ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.worker_keys ENABLE ROW LEVEL SECURITY;

DO $$
DECLARE
    t text;
BEGIN
    -- the workers serve every user's jobs
    FOREACH t IN ARRAY ARRAY['projects', 'models', 'jobs', 'logs', 'job_events', 'checkpoints', 'job_rows',
                             'worker_keys'] LOOP
        EXECUTE format('DROP POLICY IF EXISTS worker_all ON pgml.%I', t);
        EXECUTE format('CREATE POLICY worker_all ON pgml.%I TO pgml_worker USING (true) WITH CHECK (true)', t);
        EXECUTE format('DROP POLICY IF EXISTS user_read ON pgml.%I', t);
    END LOOP;
END $$;
CREATE POLICY user_read ON pgml.projects FOR SELECT TO pgml_user
    USING (owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.models FOR SELECT TO pgml_user
    USING (owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.jobs FOR SELECT TO pgml_user
    USING (submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.logs FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = logs.model_id));
CREATE POLICY user_read ON pgml.job_events FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = job_events.job_id));
CREATE POLICY user_read ON pgml.checkpoints FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = checkpoints.job_id));
CREATE POLICY user_read ON pgml.job_rows FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = job_rows.job_id));
-- pgml.tune() copies the caller's rows into its own job, only while that job is being submitted; the subquery
-- is evaluated once per statement, not per row
DROP POLICY IF EXISTS user_submit ON pgml.job_rows;
CREATE POLICY user_submit ON pgml.job_rows FOR INSERT TO pgml_user
    WITH CHECK (job_id = (SELECT max(j.id) FROM pgml.jobs j
                          WHERE j.status = 'submitting' AND j.submitted_by = session_user));

-- ---- ownership and privileges ---------------------------------------------------------------------------
-- Every object of schema pgml belongs to pgml_owner (later migrations call this again).
CREATE OR REPLACE FUNCTION pgml._own_everything() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    EXECUTE 'ALTER SCHEMA pgml OWNER TO pgml_owner';
    -- what the migrating role created; users' own tables and views in pgml stay theirs
    FOR r IN SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pgml' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
               AND c.relowner = current_user::regrole LOOP
        EXECUTE format('ALTER %s pgml.%I OWNER TO pgml_owner',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.relname);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS sig, p.prokind FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgml' AND p.proowner = current_user::regrole LOOP
        EXECUTE format('ALTER %s %s OWNER TO pgml_owner', CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                       r.sig);
    END LOOP;
END $$;
SELECT pgml._own_everything();

-- Every function of the schema pins its search_path (the earlier migrations' helpers too), except the two that
-- must see the caller's: pgml.wait (a procedure that commits cannot have one) and the tune_requests trigger.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.oid::regprocedure AS sig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgml' AND p.prokind = 'f' AND p.proname NOT IN ('_tune_request')
               AND NOT coalesce(p.proconfig, '{}') && ARRAY['search_path=pg_catalog, pg_temp'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', r.sig);
    END LOOP;
END $$;

REVOKE ALL ON SCHEMA pgml FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgml FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgml FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA pgml FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE pgml_owner IN SCHEMA pgml REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- users: the API, and reading their own rows
GRANT USAGE ON SCHEMA pgml TO pgml_user, pgml_worker;
GRANT EXECUTE ON FUNCTION pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                                    integer, integer, text) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml._submit(text, text, text, text, text, jsonb, double precision, text, boolean, boolean,
                                       integer, integer, text, oid, text) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml._submitted(bigint) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.cancel(bigint) TO pgml_user;
GRANT EXECUTE ON PROCEDURE pgml.wait(bigint, real, real) TO pgml_user;
GRANT SELECT ON pgml.projects, pgml.models, pgml.jobs, pgml.logs, pgml.files, pgml.job_events, pgml.checkpoints,
                pgml.tasks, pgml.job_status, pgml.queue_summary, pgml.job_rows, pgml.role_limits TO pgml_user;
GRANT INSERT, UPDATE, DELETE ON pgml.role_limits TO pgml_admin;
GRANT INSERT ON pgml.job_rows, pgml.tune_requests TO pgml_user;
GRANT SELECT ON pgml.tune_requests TO pgml_user;

-- workers: the queue, logs, files and checkpoints; never a user's relation, never schema changes
GRANT SELECT, UPDATE ON pgml.jobs TO pgml_worker;
GRANT SELECT, UPDATE ON pgml.models TO pgml_worker;
GRANT SELECT ON pgml.projects, pgml.tasks, pgml.job_rows, pgml.job_events, pgml.job_status, pgml.queue_summary
    TO pgml_worker;
GRANT SELECT, INSERT ON pgml.logs, pgml.worker_keys TO pgml_worker;
GRANT SELECT, INSERT, DELETE ON pgml.file_parts, pgml.checkpoints, pgml.checkpoint_files TO pgml_worker;
GRANT SELECT ON pgml.files TO pgml_worker;
GRANT UPDATE ON pgml.checkpoints TO pgml_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgml TO pgml_worker;
-- registering a worker's public key checks its fingerprint (the worker_keys CHECK constraint calls these)
GRANT EXECUTE ON FUNCTION pgml._key_fingerprint(numeric), pgml._numeric_to_bytea(numeric, integer) TO pgml_worker;

-- ---- users' tables and views in schema pgml ----------------------------------------------------------------
-- The guide creates its views in schema pgml (CREATE VIEW pgml.imdb_train_view ...). Anyone who may create
-- objects in a schema may also create functions there, and a user's pgml.cancel(integer) would run as whoever
-- calls pgml.cancel(5): so users get CREATE on schema pgml only together with an event trigger that refuses
-- every object but tables, views, indexes and sequences from anyone who is not pgml_owner. Event triggers need
-- a superuser; a migration run by a non-superuser leaves CREATE on pgml to pgml_owner alone (say so).
CREATE OR REPLACE FUNCTION pgml._guard_schema() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    obj record;
BEGIN
    IF pg_has_role(current_user, 'pgml_owner', 'MEMBER') THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF obj.schema_name = 'pgml' AND obj.object_type NOT IN
           ('table', 'view', 'materialized view', 'index', 'sequence', 'table column', 'table constraint',
            'trigger', 'rule', 'policy', 'statistics object') THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = format('%s may not create a %s in schema pgml (%s)', current_user, obj.object_type,
                                 obj.object_identity),
                HINT = 'schema pgml takes your tables and views; create functions and types in a schema of your own';
        END IF;
    END LOOP;
END $$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS pgml_guard_schema;
        CREATE EVENT TRIGGER pgml_guard_schema ON ddl_command_end EXECUTE FUNCTION pgml._guard_schema();
        GRANT CREATE ON SCHEMA pgml TO pgml_user;
    ELSE
        RAISE NOTICE 'not a superuser: no event trigger guards schema pgml, so pgml_user gets no CREATE on it '
                     '(create the guide''s views in a schema of your own, or migrate once as a superuser)';
    END IF;
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0008_security') ON CONFLICT DO NOTHING;
