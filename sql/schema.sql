-- The schema pgml-tuned makes: written by scripts/schema_dump, checked by tests/integration/test_schema.py.
-- Read it; change sql/migrations and sql/functions, never this file.

-- ==== schemas ====

CREATE SCHEMA pgml;  -- owner pgml_owner
CREATE SCHEMA pgml_dblink;  -- owner <superuser>
CREATE SCHEMA pgml_rows;  -- owner pgml_owner
CREATE SCHEMA pgml_staging;  -- owner pgml_owner

-- ==== extensions ====

CREATE EXTENSION dblink SCHEMA pgml_dblink;

-- ==== tables, views and sequences ====

-- table pgml.checkpoint_files, owner pgml_owner
CREATE TABLE pgml.checkpoint_files (
    checkpoint_id bigint NOT NULL,
    path text NOT NULL,
    part integer NOT NULL,
    data bytea NOT NULL,
    CONSTRAINT checkpoint_files_checkpoint_id_fkey FOREIGN KEY (checkpoint_id) REFERENCES pgml.checkpoints(id) ON DELETE CASCADE,
    CONSTRAINT checkpoint_files_pkey PRIMARY KEY (checkpoint_id, path, part)
);
CREATE TRIGGER checkpoint_files_child_check BEFORE INSERT ON pgml.checkpoint_files FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();
GRANT INSERT ON TABLE pgml.checkpoint_files TO pgml_child;

-- table pgml.checkpoints, owner pgml_owner
CREATE TABLE pgml.checkpoints (
    id bigint DEFAULT nextval('pgml.checkpoints_id_seq'::regclass) NOT NULL,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    step bigint NOT NULL,
    files integer DEFAULT 0 NOT NULL,
    bytes bigint DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT checkpoints_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT checkpoints_job_id_step_key UNIQUE (job_id, step),
    CONSTRAINT checkpoints_pkey PRIMARY KEY (id)
);
ALTER TABLE pgml.checkpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_read ON pgml.checkpoints FOR SELECT TO pgml_user
    USING ((EXISTS ( SELECT 1
   FROM pgml.jobs j
  WHERE (j.id = checkpoints.job_id))));
CREATE POLICY worker_all ON pgml.checkpoints FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.checkpoints TO pgml_user;

-- sequence pgml.checkpoints_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.checkpoints_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.checkpoints.id;
GRANT USAGE ON SEQUENCE pgml.checkpoints_id_seq TO pgml_worker;

-- table pgml.credential_grants, owner pgml_owner
CREATE TABLE pgml.credential_grants (
    credential text NOT NULL,
    role name NOT NULL,
    granted_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    granted_by name DEFAULT SESSION_USER NOT NULL,
    CONSTRAINT credential_grants_credential_fkey FOREIGN KEY (credential) REFERENCES pgml.credentials(name) ON DELETE CASCADE,
    CONSTRAINT credential_grants_pkey PRIMARY KEY (credential, role)
);
ALTER TABLE pgml.credential_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_read ON pgml.credential_grants FOR SELECT TO pgml_user
    USING ((pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR (EXISTS ( SELECT 1
   FROM pg_roles r
  WHERE ((r.rolname = credential_grants.role) AND pg_has_role(SESSION_USER, r.oid, 'MEMBER'::text))))));
GRANT SELECT ON TABLE pgml.credential_grants TO pgml_user;

-- table pgml.credentials, owner pgml_owner
CREATE TABLE pgml.credentials (
    name text NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    created_by name DEFAULT SESSION_USER NOT NULL,
    CONSTRAINT credentials_name_check CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'::text),
    CONSTRAINT credentials_pkey PRIMARY KEY (name)
);
ALTER TABLE pgml.credentials ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_read ON pgml.credentials FOR SELECT TO pgml_user
    USING ((pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR (EXISTS ( SELECT 1
   FROM (pgml.credential_grants g
     JOIN pg_roles r ON ((r.rolname = g.role)))
  WHERE ((g.credential = credentials.name) AND pg_has_role(SESSION_USER, r.oid, 'MEMBER'::text))))));
GRANT SELECT ON TABLE pgml.credentials TO pgml_user;

-- table pgml.datasets, owner pgml_owner
CREATE TABLE pgml.datasets (
    name text NOT NULL,
    source text NOT NULL,
    subset text,
    loaded_by name NOT NULL,
    job_id bigint,
    rows bigint NOT NULL,
    columns jsonb NOT NULL,
    loaded_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT datasets_pkey PRIMARY KEY (name)
);
ALTER TABLE pgml.datasets ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_read ON pgml.datasets FOR SELECT TO pgml_user
    USING (((loaded_by = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text)));
GRANT SELECT ON TABLE pgml.datasets TO pgml_user;

-- table pgml.deployments, owner pgml_owner
CREATE TABLE pgml.deployments (
    id bigint DEFAULT nextval('pgml.deployments_id_seq'::regclass) NOT NULL,
    project_id bigint NOT NULL,
    model_id bigint NOT NULL,
    strategy text DEFAULT 'manual'::text NOT NULL,
    deployed_by name DEFAULT SESSION_USER NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT deployments_model_id_fkey FOREIGN KEY (model_id) REFERENCES pgml.models(id) ON DELETE CASCADE,
    CONSTRAINT deployments_pkey PRIMARY KEY (id),
    CONSTRAINT deployments_project_id_fkey FOREIGN KEY (project_id) REFERENCES pgml.projects(id) ON DELETE CASCADE
);
ALTER TABLE pgml.deployments ENABLE ROW LEVEL SECURITY;
CREATE INDEX deployments_project_idx ON pgml.deployments USING btree (project_id, id DESC);
CREATE POLICY own_deployments ON pgml.deployments FOR SELECT TO PUBLIC
    USING ((EXISTS ( SELECT 1
   FROM pgml.projects p
  WHERE ((p.id = deployments.project_id) AND ((p.owner = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text))))));
CREATE POLICY worker_all ON pgml.deployments FOR SELECT TO pgml_worker
    USING (true);
GRANT SELECT ON TABLE pgml.deployments TO pgml_user;
GRANT SELECT ON TABLE pgml.deployments TO pgml_worker;

-- sequence pgml.deployments_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.deployments_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.deployments.id;

-- table pgml.file_parts, owner pgml_owner
CREATE TABLE pgml.file_parts (
    id bigint DEFAULT nextval('pgml.files_id_seq'::regclass) NOT NULL,
    model_id bigint NOT NULL,
    path text NOT NULL,
    part integer NOT NULL,
    data bytea NOT NULL,
    CONSTRAINT files_model_id_fkey FOREIGN KEY (model_id) REFERENCES pgml.models(id) ON DELETE CASCADE,
    CONSTRAINT files_model_id_path_part_key UNIQUE (model_id, path, part),
    CONSTRAINT files_pkey PRIMARY KEY (id)
);
CREATE TRIGGER file_parts_child_check BEFORE INSERT ON pgml.file_parts FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();
GRANT INSERT ON TABLE pgml.file_parts TO pgml_child;
GRANT INSERT ON TABLE pgml.file_parts TO pgml_user;

-- view pgml.files, owner pgml_owner
CREATE VIEW pgml.files WITH (security_barrier=true) AS
 SELECT id,
    model_id,
    path,
    part,
    data
   FROM pgml.file_parts f
  WHERE (EXISTS ( SELECT 1
           FROM pgml.models m
          WHERE m.id = model_id AND (m.owner = SESSION_USER OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text))));
GRANT SELECT ON VIEW pgml.files TO pgml_user;

-- sequence pgml.files_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.files_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.file_parts.id;
GRANT USAGE ON SEQUENCE pgml.files_id_seq TO pgml_child;
GRANT USAGE ON SEQUENCE pgml.files_id_seq TO pgml_user;
GRANT USAGE ON SEQUENCE pgml.files_id_seq TO pgml_worker;

-- table pgml.gang_members, owner pgml_owner
CREATE TABLE pgml.gang_members (
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    node integer NOT NULL,
    worker text NOT NULL,
    child_ticket bytea,
    joined_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    outcome text,
    error text,
    error_at double precision,
    CONSTRAINT gang_members_job_id_attempt_worker_key UNIQUE (job_id, attempt, worker),
    CONSTRAINT gang_members_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT gang_members_node_check CHECK (node >= 1),
    CONSTRAINT gang_members_outcome_check CHECK (outcome = ANY (ARRAY['ok'::text, 'error'::text, 'stopped'::text])),
    CONSTRAINT gang_members_pkey PRIMARY KEY (job_id, attempt, node)
);
GRANT DELETE, INSERT, SELECT, UPDATE ON TABLE pgml.gang_members TO pgml_worker;
GRANT SELECT ON TABLE pgml.gang_members TO pgml_admin;

-- table pgml.gang_secrets, owner pgml_owner
CREATE TABLE pgml.gang_secrets (
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    secret text NOT NULL,
    CONSTRAINT gang_secrets_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT gang_secrets_pkey PRIMARY KEY (job_id)
);
GRANT DELETE, INSERT, SELECT, UPDATE ON TABLE pgml.gang_secrets TO pgml_worker;

-- table pgml.hub_allowlist, owner pgml_owner
CREATE TABLE pgml.hub_allowlist (
    pattern text NOT NULL,
    note text,
    added_by name DEFAULT SESSION_USER NOT NULL,
    added_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT hub_allowlist_pkey PRIMARY KEY (pattern)
);
GRANT SELECT ON TABLE pgml.hub_allowlist TO pgml_user;
GRANT SELECT ON TABLE pgml.hub_allowlist TO pgml_worker;

-- table pgml.job_events, owner pgml_owner
CREATE TABLE pgml.job_events (
    id bigint DEFAULT nextval('pgml.job_events_id_seq'::regclass) NOT NULL,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker text,
    old_status text,
    new_status text NOT NULL,
    lease_expires_at timestamp with time zone,
    at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT job_events_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT job_events_pkey PRIMARY KEY (id)
);
ALTER TABLE pgml.job_events ENABLE ROW LEVEL SECURITY;
CREATE INDEX job_events_job_idx ON pgml.job_events USING btree (job_id, id);
CREATE POLICY user_read ON pgml.job_events FOR SELECT TO pgml_user
    USING ((EXISTS ( SELECT 1
   FROM pgml.jobs j
  WHERE (j.id = job_events.job_id))));
CREATE POLICY worker_all ON pgml.job_events FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.job_events TO pgml_user;
GRANT SELECT ON TABLE pgml.job_events TO pgml_worker;

-- sequence pgml.job_events_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.job_events_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.job_events.id;
GRANT USAGE ON SEQUENCE pgml.job_events_id_seq TO pgml_worker;

-- table pgml.job_rows, owner pgml_owner
CREATE TABLE pgml.job_rows (
    job_id bigint NOT NULL,
    n bigint NOT NULL,
    c1 text,
    c2 text,
    c3 text,
    c4 text,
    c5 text,
    c6 text,
    c7 text,
    c8 text
);
ALTER TABLE pgml.job_rows ENABLE ROW LEVEL SECURITY;
CREATE INDEX job_rows_job_brin ON pgml.job_rows USING brin (job_id) WITH (pages_per_range='16', autosummarize='on');
CREATE POLICY user_read ON pgml.job_rows FOR SELECT TO pgml_user
    USING ((EXISTS ( SELECT 1
   FROM pgml.jobs j
  WHERE (j.id = job_rows.job_id))));
CREATE POLICY user_submit ON pgml.job_rows FOR INSERT TO pgml_user
    WITH CHECK ((job_id = ( SELECT max(j.id) AS max
   FROM pgml.jobs j
  WHERE ((j.status = 'submitting'::text) AND (j.submitted_by = SESSION_USER)))));
CREATE POLICY worker_all ON pgml.job_rows FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.job_rows TO pgml_user;

-- view pgml.job_status, owner pgml_owner
CREATE VIEW pgml.job_status WITH (security_invoker=true) AS
 SELECT j.id,
    p.name AS project,
    j.task,
    j.status,
    j.attempt,
    j.max_attempts,
    j.worker,
        CASE
            WHEN j.status = 'running'::text THEN round(EXTRACT(epoch FROM clock_timestamp() - j.heartbeat_at), 1)
            ELSE NULL::numeric
        END AS heartbeat_age,
    (j.progress ->> 'step'::text)::bigint AS step,
    (j.progress ->> 'max_steps'::text)::bigint AS max_steps,
    round(100.0 * ((j.progress ->> 'step'::text)::numeric) / NULLIF((j.progress ->> 'max_steps'::text)::numeric, 0::numeric), 1) AS progress_pct,
    (j.progress ->> 'loss'::text)::double precision AS last_loss,
        CASE
            WHEN j.status = 'running'::text AND ((j.progress ->> 'steps_per_second'::text)::double precision) > 0::double precision THEN make_interval(secs => GREATEST(0::double precision, (((j.progress ->> 'max_steps'::text)::double precision) - ((j.progress ->> 'step'::text)::double precision)) / ((j.progress ->> 'steps_per_second'::text)::double precision)))
            ELSE NULL::interval
        END AS eta,
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
  WHERE j.submitted_by = SESSION_USER OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text);
GRANT SELECT ON VIEW pgml.job_status TO pgml_user;
GRANT SELECT ON VIEW pgml.job_status TO pgml_worker;

-- table pgml.jobs, owner pgml_owner
CREATE TABLE pgml.jobs (
    id bigint DEFAULT nextval('pgml.jobs_id_seq'::regclass) NOT NULL,
    project_id bigint NOT NULL,
    model_id bigint NOT NULL,
    status text DEFAULT 'queued'::text NOT NULL,
    task text NOT NULL,
    relation_name text,
    relation_schema text,
    relation_table text,
    model_name text NOT NULL,
    test_size double precision NOT NULL,
    test_sampling text NOT NULL,
    hyperparams jsonb DEFAULT '{}'::jsonb NOT NULL,
    secrets text,
    submitted_by text DEFAULT SESSION_USER NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    attempt integer DEFAULT 0 NOT NULL,
    failed_attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 3 NOT NULL,
    worker text,
    lease_expires_at timestamp with time zone,
    heartbeat_at timestamp with time zone,
    cancel_requested boolean DEFAULT false NOT NULL,
    progress jsonb DEFAULT '{}'::jsonb NOT NULL,
    metrics jsonb,
    error text,
    errors jsonb DEFAULT '[]'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    snapshot_columns text[],
    snapshot_rows bigint,
    keep_snapshot boolean DEFAULT false NOT NULL,
    max_running integer,
    max_runtime interval,
    max_checkpoint_bytes bigint,
    credential text,
    child_ticket bytea,
    automatic_deploy boolean DEFAULT true NOT NULL,
    rendezvous text,
    gang_needed integer DEFAULT 0 NOT NULL,
    CONSTRAINT jobs_max_attempts_check CHECK (max_attempts >= 1),
    CONSTRAINT jobs_model_id_fkey FOREIGN KEY (model_id) REFERENCES pgml.models(id) ON DELETE CASCADE,
    CONSTRAINT jobs_pkey PRIMARY KEY (id),
    CONSTRAINT jobs_project_id_fkey FOREIGN KEY (project_id) REFERENCES pgml.projects(id) ON DELETE CASCADE,
    CONSTRAINT jobs_status_check CHECK (status = ANY (ARRAY['submitting'::text, 'queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'cancelled'::text])),
    CONSTRAINT jobs_submitted_at_commit TRIGGER DEFERRABLE INITIALLY DEFERRED
) WITH (fillfactor=80, autovacuum_analyze_threshold=5000);
ALTER TABLE pgml.jobs ENABLE ROW LEVEL SECURITY;
CREATE INDEX jobs_gang_forming ON pgml.jobs USING btree (priority DESC, id) WHERE ((gang_needed > 0) AND (status = 'running'::text));
CREATE INDEX jobs_model_idx ON pgml.jobs USING btree (model_id);
CREATE INDEX jobs_queued_idx ON pgml.jobs USING btree (priority DESC, id) WHERE (status = 'queued'::text);
CREATE INDEX jobs_running_idx ON pgml.jobs USING btree (id) WHERE (status = 'running'::text);
CREATE INDEX jobs_running_submitter_idx ON pgml.jobs USING btree (submitted_by) WHERE (status = 'running'::text);
CREATE INDEX jobs_submitting_idx ON pgml.jobs USING btree (submitted_by, id) WHERE (status = 'submitting'::text);
CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE OF status, attempt ON pgml.jobs FOR EACH ROW EXECUTE FUNCTION pgml._job_changed();
CREATE TRIGGER jobs_dataset_ended AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW WHEN (new.task = 'load_dataset'::text AND old.status = 'running'::text AND new.status <> 'running'::text) EXECUTE FUNCTION pgml._dataset_job_ended();
CREATE TRIGGER jobs_dataset_inserted BEFORE INSERT ON pgml.jobs FOR EACH ROW WHEN (new.task = 'load_dataset'::text AND new.relation_name IS NOT NULL) EXECUTE FUNCTION pgml._dataset_job_inserted();
CREATE TRIGGER jobs_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_deleted();
CREATE TRIGGER jobs_hub_allowlist BEFORE INSERT OR UPDATE OF status, model_name ON pgml.jobs FOR EACH ROW WHEN (new.status = ANY (ARRAY['submitting'::text, 'queued'::text])) EXECUTE FUNCTION pgml._job_hub_check();
CREATE TRIGGER jobs_limits BEFORE INSERT ON pgml.jobs FOR EACH ROW EXECUTE FUNCTION pgml._check_job_limits();
CREATE TRIGGER jobs_logged AFTER UPDATE OF status, attempt ON pgml.jobs FOR EACH ROW EXECUTE FUNCTION pgml._job_logged();
CREATE TRIGGER jobs_resources_check BEFORE INSERT ON pgml.jobs FOR EACH ROW WHEN (new.hyperparams ? 'resources'::text) EXECUTE FUNCTION pgml._jobs_resources_check();
CREATE TRIGGER jobs_resources_notice AFTER INSERT ON pgml.jobs FOR EACH ROW WHEN (new.hyperparams ? 'resources'::text) EXECUTE FUNCTION pgml._jobs_resources_check();
CREATE CONSTRAINT TRIGGER jobs_submitted_at_commit AFTER INSERT OR UPDATE OF status ON pgml.jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (new.status = 'submitting'::text) EXECUTE FUNCTION pgml._job_submit_ended();
CREATE TRIGGER jobs_succeeded_deploy AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW WHEN (new.status = 'succeeded'::text AND old.status IS DISTINCT FROM 'succeeded'::text) EXECUTE FUNCTION pgml._job_succeeded_deploy();
CREATE TRIGGER jobs_table_ended AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW WHEN ((new.status = ANY (ARRAY['succeeded'::text, 'failed'::text, 'cancelled'::text])) AND old.status IS DISTINCT FROM new.status AND NOT new.keep_snapshot AND new.snapshot_columns IS NOT NULL) EXECUTE FUNCTION pgml._job_table_ended();
CREATE TRIGGER jobs_tables_deleted AFTER DELETE ON pgml.jobs REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION pgml._job_tables_deleted();
CREATE POLICY user_read ON pgml.jobs FOR SELECT TO pgml_user
    USING (((submitted_by = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text)));
CREATE POLICY worker_all ON pgml.jobs FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.jobs TO pgml_user;
GRANT SELECT, UPDATE ON TABLE pgml.jobs TO pgml_worker;

-- sequence pgml.jobs_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.jobs_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.jobs.id;
GRANT USAGE ON SEQUENCE pgml.jobs_id_seq TO pgml_worker;

-- table pgml.logs, owner pgml_owner
CREATE TABLE pgml.logs (
    id bigint DEFAULT nextval('pgml.logs_id_seq'::regclass) NOT NULL,
    model_id bigint NOT NULL,
    project_id bigint NOT NULL,
    job_id bigint,
    attempt integer,
    seq integer,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    logs jsonb NOT NULL,
    kind text DEFAULT 'train'::text NOT NULL,
    CONSTRAINT logs_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT logs_kind_check CHECK (kind = ANY (ARRAY['train'::text, 'info'::text, 'warning'::text, 'error'::text])),
    CONSTRAINT logs_model_id_fkey FOREIGN KEY (model_id) REFERENCES pgml.models(id) ON DELETE CASCADE,
    CONSTRAINT logs_pkey PRIMARY KEY (id),
    CONSTRAINT logs_project_id_fkey FOREIGN KEY (project_id) REFERENCES pgml.projects(id) ON DELETE CASCADE
);
ALTER TABLE pgml.logs ENABLE ROW LEVEL SECURITY;
CREATE INDEX logs_job_idx ON pgml.logs USING btree (job_id, id);
CREATE INDEX logs_model_idx ON pgml.logs USING btree (model_id, id);
CREATE UNIQUE INDEX logs_seq_idx ON pgml.logs USING btree (job_id, attempt, seq);
CREATE TRIGGER logs_written AFTER INSERT ON pgml.logs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgml._logs_written();
CREATE POLICY user_read ON pgml.logs FOR SELECT TO pgml_user
    USING ((EXISTS ( SELECT 1
   FROM pgml.models m
  WHERE (m.id = logs.model_id))));
CREATE POLICY worker_all ON pgml.logs FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.logs TO pgml_user;
GRANT SELECT ON TABLE pgml.logs TO pgml_worker;

-- sequence pgml.logs_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.logs_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.logs.id;
GRANT USAGE ON SEQUENCE pgml.logs_id_seq TO pgml_worker;

-- table pgml.loopback_login, owner pgml_owner
CREATE TABLE pgml.loopback_login (
    id boolean DEFAULT true NOT NULL,
    login name NOT NULL,
    password text NOT NULL,
    secret text NOT NULL,
    conninfo text NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT loopback_login_id_check CHECK (id),
    CONSTRAINT loopback_login_pkey PRIMARY KEY (id)
);

-- table pgml.models, owner pgml_owner
CREATE TABLE pgml.models (
    id bigint DEFAULT nextval('pgml.models_id_seq'::regclass) NOT NULL,
    project_id bigint NOT NULL,
    status text DEFAULT 'in_progress'::text NOT NULL,
    task text NOT NULL,
    model_name text NOT NULL,
    base_model text,
    relation_name text,
    hyperparams jsonb DEFAULT '{}'::jsonb NOT NULL,
    metrics jsonb,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    updated_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    owner name DEFAULT SESSION_USER NOT NULL,
    files_freed_at timestamp with time zone,
    CONSTRAINT models_import_finished TRIGGER DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT models_pkey PRIMARY KEY (id),
    CONSTRAINT models_project_id_fkey FOREIGN KEY (project_id) REFERENCES pgml.projects(id) ON DELETE CASCADE,
    CONSTRAINT models_status_check CHECK (status = ANY (ARRAY['in_progress'::text, 'successful'::text, 'failed'::text, 'cancelled'::text]))
);
ALTER TABLE pgml.models ENABLE ROW LEVEL SECURITY;
CREATE INDEX models_project_idx ON pgml.models USING btree (project_id, id);
CREATE CONSTRAINT TRIGGER models_import_finished AFTER INSERT ON pgml.models DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (new.hyperparams ? 'import'::text) EXECUTE FUNCTION pgml._import_finished();
CREATE POLICY user_read ON pgml.models FOR SELECT TO pgml_user
    USING (((owner = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text)));
CREATE POLICY worker_all ON pgml.models FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.models TO pgml_user;
GRANT SELECT ON TABLE pgml.models TO pgml_worker;

-- sequence pgml.models_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.models_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.models.id;
GRANT USAGE ON SEQUENCE pgml.models_id_seq TO pgml_worker;

-- table pgml.output_tables, owner pgml_owner
CREATE TABLE pgml.output_tables (
    name text NOT NULL,
    kind text NOT NULL,
    owner name NOT NULL,
    job_id bigint,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT output_tables_pkey PRIMARY KEY (name)
);
ALTER TABLE pgml.output_tables ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_outputs ON pgml.output_tables FOR SELECT TO PUBLIC
    USING (((owner = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text)));
GRANT SELECT ON TABLE pgml.output_tables TO pgml_user;

-- table pgml.projects, owner pgml_owner
CREATE TABLE pgml.projects (
    id bigint DEFAULT nextval('pgml.projects_id_seq'::regclass) NOT NULL,
    name text NOT NULL,
    task text NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    updated_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    owner name DEFAULT SESSION_USER NOT NULL,
    CONSTRAINT projects_owner_name_key UNIQUE (owner, name),
    CONSTRAINT projects_pkey PRIMARY KEY (id)
);
ALTER TABLE pgml.projects ENABLE ROW LEVEL SECURITY;
CREATE POLICY user_read ON pgml.projects FOR SELECT TO pgml_user
    USING (((owner = SESSION_USER) OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text)));
CREATE POLICY worker_all ON pgml.projects FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.projects TO pgml_user;
GRANT SELECT ON TABLE pgml.projects TO pgml_worker;

-- sequence pgml.projects_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.projects_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.projects.id;
GRANT USAGE ON SEQUENCE pgml.projects_id_seq TO pgml_worker;

-- view pgml.queue_summary, owner pgml_owner
CREATE VIEW pgml.queue_summary WITH (security_invoker=true) AS
 SELECT s.status,
    count(j.id) AS jobs,
    count(DISTINCT j.worker) FILTER (WHERE j.status = 'running'::text) AS workers,
    count(*) FILTER (WHERE j.status = 'running'::text AND j.lease_expires_at < clock_timestamp()) AS expired_leases,
    max(clock_timestamp() - j.created_at) FILTER (WHERE j.status = 'queued'::text) AS oldest_queued_age,
    f.live_workers,
    f.gone_workers,
    f.free_slots,
    f.free_gpus
   FROM ( VALUES ('queued'::text), ('running'::text), ('succeeded'::text), ('failed'::text), ('cancelled'::text)) s(status)
     CROSS JOIN ( SELECT count(*) FILTER (WHERE w.state = ANY (ARRAY['live'::text, 'late'::text])) AS live_workers,
            count(*) FILTER (WHERE w.state = 'gone'::text) AS gone_workers,
            COALESCE(sum(w.free_slots) FILTER (WHERE w.state = ANY (ARRAY['live'::text, 'late'::text])), 0::bigint) AS free_slots,
            COALESCE(sum(w.free_gpus) FILTER (WHERE w.state = ANY (ARRAY['live'::text, 'late'::text])), 0::bigint) AS free_gpus
           FROM pgml.worker_status w) f
     LEFT JOIN pgml.jobs j ON j.status = s.status AND (j.submitted_by = SESSION_USER OR pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text))
  GROUP BY s.status, f.live_workers, f.gone_workers, f.free_slots, f.free_gpus
  ORDER BY (array_position(ARRAY['queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'cancelled'::text], s.status));
GRANT SELECT ON VIEW pgml.queue_summary TO pgml_user;
GRANT SELECT ON VIEW pgml.queue_summary TO pgml_worker;

-- table pgml.request_chunks, owner pgml_owner
CREATE TABLE pgml.request_chunks (
    request_id bigint NOT NULL,
    seq integer NOT NULL,
    text text NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT request_chunks_pkey PRIMARY KEY (request_id, seq),
    CONSTRAINT request_chunks_request_id_fkey FOREIGN KEY (request_id) REFERENCES pgml.requests(id) ON DELETE CASCADE
);
ALTER TABLE pgml.request_chunks ENABLE ROW LEVEL SECURITY;

-- table pgml.requests, owner pgml_owner
CREATE TABLE pgml.requests (
    id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
    submitted_by name NOT NULL,
    kind text NOT NULL,
    model text NOT NULL,
    args jsonb DEFAULT '{}'::jsonb NOT NULL,
    inputs jsonb NOT NULL,
    stream boolean DEFAULT false NOT NULL,
    status text DEFAULT 'queued'::text NOT NULL,
    claimed_by text,
    lease_expires_at timestamp with time zone,
    deadline timestamp with time zone NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    result jsonb,
    error text,
    usage jsonb,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    answered_at timestamp with time zone,
    n_inputs integer DEFAULT 1 NOT NULL,
    vectors real[],
    CONSTRAINT requests_kind_check CHECK (kind = ANY (ARRAY['classify'::text, 'generate'::text, 'chat'::text, 'embed'::text, 'rank'::text])),
    CONSTRAINT requests_pkey PRIMARY KEY (id),
    CONSTRAINT requests_status_check CHECK (status = ANY (ARRAY['queued'::text, 'running'::text, 'done'::text, 'failed'::text]))
);
ALTER TABLE pgml.requests ENABLE ROW LEVEL SECURITY;
CREATE INDEX requests_pending_idx ON pgml.requests USING btree (submitted_by, id) INCLUDE (n_inputs) WHERE (status = ANY (ARRAY['queued'::text, 'running'::text]));
CREATE INDEX requests_queued_idx ON pgml.requests USING btree (id) WHERE (status = 'queued'::text);
CREATE INDEX requests_running_idx ON pgml.requests USING btree (claimed_by) WHERE (status = 'running'::text);

-- sequence pgml.requests_id_seq, owner pgml_owner
CREATE SEQUENCE pgml.requests_id_seq AS bigint START 1 INCREMENT 1 MINVALUE 1 MAXVALUE 9223372036854775807 CACHE 1 OWNED BY pgml.requests.id;

-- table pgml.role_limits, owner pgml_owner
CREATE TABLE pgml.role_limits (
    role name NOT NULL,
    max_queued integer,
    max_running integer,
    max_snapshot_bytes bigint,
    max_runtime interval,
    max_checkpoint_bytes bigint,
    max_gpus integer,
    max_procs integer,
    max_nodes integer,
    max_pending_requests integer,
    max_pending_inputs integer,
    CONSTRAINT role_limits_pkey PRIMARY KEY (role)
);
GRANT DELETE, INSERT, UPDATE ON TABLE pgml.role_limits TO pgml_admin;
GRANT SELECT ON TABLE pgml.role_limits TO pgml_user;

-- table pgml.schema_migrations, owner pgml_owner
CREATE TABLE pgml.schema_migrations (
    version text NOT NULL,
    applied_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT schema_migrations_pkey PRIMARY KEY (version)
);

-- view pgml.sealing_key_use, owner pgml_owner
CREATE VIEW pgml.sealing_key_use WITH (security_invoker=true) AS
 SELECT key_id,
    active,
    created_at,
    retired_at,
    ( SELECT count(*) AS count
           FROM pgml.jobs j
          WHERE j.secrets ~~ (('v2:'::text || key_id) || ':%'::text) AND (j.status = ANY (ARRAY['submitting'::text, 'queued'::text, 'running'::text]))) AS pending_jobs
   FROM pgml.sealing_keys k;
GRANT SELECT ON VIEW pgml.sealing_key_use TO pgml_admin;

-- table pgml.sealing_keys, owner pgml_owner
CREATE TABLE pgml.sealing_keys (
    key_id text NOT NULL,
    n numeric NOT NULL,
    e numeric NOT NULL,
    active boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    created_by name DEFAULT SESSION_USER NOT NULL,
    retired_at timestamp with time zone,
    CONSTRAINT sealing_keys_e_check CHECK (e >= 3::numeric AND scale(e) = 0 AND mod(e, 2::numeric) = 1::numeric),
    CONSTRAINT sealing_keys_id_matches CHECK (key_id = pgml._key_fingerprint(n)),
    CONSTRAINT sealing_keys_n_check CHECK (n > 0::numeric AND scale(n) = 0),
    CONSTRAINT sealing_keys_pkey PRIMARY KEY (key_id),
    CONSTRAINT sealing_keys_retired_inactive CHECK (retired_at IS NULL OR NOT active)
);
ALTER TABLE pgml.sealing_keys ENABLE ROW LEVEL SECURITY;
CREATE UNIQUE INDEX sealing_keys_one_active ON pgml.sealing_keys USING btree (active) WHERE active;
CREATE POLICY admin_read ON pgml.sealing_keys FOR SELECT TO pgml_admin
    USING (true);
GRANT SELECT ON TABLE pgml.sealing_keys TO pgml_admin;

-- table pgml.superseded_logs, owner pgml_owner
CREATE TABLE pgml.superseded_logs (
    id bigint NOT NULL,
    model_id bigint NOT NULL,
    project_id bigint NOT NULL,
    job_id bigint,
    attempt integer,
    seq integer,
    created_at timestamp with time zone NOT NULL,
    kind text NOT NULL,
    logs jsonb NOT NULL,
    superseded_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    superseded_by integer NOT NULL,
    resumed_from_step bigint NOT NULL,
    CONSTRAINT superseded_logs_job_id_fkey FOREIGN KEY (job_id) REFERENCES pgml.jobs(id) ON DELETE CASCADE,
    CONSTRAINT superseded_logs_model_id_fkey FOREIGN KEY (model_id) REFERENCES pgml.models(id) ON DELETE CASCADE,
    CONSTRAINT superseded_logs_pkey PRIMARY KEY (id),
    CONSTRAINT superseded_logs_project_id_fkey FOREIGN KEY (project_id) REFERENCES pgml.projects(id) ON DELETE CASCADE
);
ALTER TABLE pgml.superseded_logs ENABLE ROW LEVEL SECURITY;
CREATE INDEX superseded_logs_job_idx ON pgml.superseded_logs USING btree (job_id, id);
CREATE INDEX superseded_logs_model_idx ON pgml.superseded_logs USING btree (model_id, id);
CREATE POLICY user_read ON pgml.superseded_logs FOR SELECT TO pgml_user
    USING ((EXISTS ( SELECT 1
   FROM pgml.models m
  WHERE (m.id = superseded_logs.model_id))));
CREATE POLICY worker_all ON pgml.superseded_logs FOR ALL TO pgml_worker
    USING (true)
    WITH CHECK (true);
GRANT SELECT ON TABLE pgml.superseded_logs TO pgml_user;
GRANT SELECT ON TABLE pgml.superseded_logs TO pgml_worker;

-- table pgml.tasks, owner pgml_owner
CREATE TABLE pgml.tasks (
    name text NOT NULL,
    required_columns jsonb NOT NULL,
    text_columns text[] NOT NULL,
    optional_columns text[] DEFAULT '{}'::text[] NOT NULL,
    hyperparams text[] DEFAULT '{}'::text[] NOT NULL,
    admin_only boolean DEFAULT false NOT NULL,
    loads_model boolean DEFAULT true NOT NULL,
    CONSTRAINT tasks_pkey PRIMARY KEY (name)
);
GRANT SELECT ON TABLE pgml.tasks TO pgml_user;
GRANT SELECT ON TABLE pgml.tasks TO pgml_worker;

-- table pgml.training_arg_types, owner pgml_owner
CREATE TABLE pgml.training_arg_types (
    key text NOT NULL,
    json_types text[] NOT NULL,
    python_type text NOT NULL,
    example jsonb NOT NULL,
    min_value numeric,
    min_inclusive boolean,
    max_value numeric,
    max_inclusive boolean,
    also_allowed numeric[],
    CONSTRAINT training_arg_types_pkey PRIMARY KEY (key)
);
COMMENT ON TABLE pgml.training_arg_types IS 'The JSON types of each transformers.TrainingArguments field, and the range of the numeric ones, checked by pgml.tune() at submit; generated by scripts/training_arg_types.py';
GRANT SELECT ON TABLE pgml.training_arg_types TO pgml_user;

-- view pgml.tune_requests, owner pgml_owner
CREATE VIEW pgml.tune_requests WITH (security_barrier=true) AS
 SELECT NULL::text AS project_name,
    NULL::text AS task,
    NULL::text AS relation_name,
    NULL::text AS y_column_name,
    NULL::text AS model_name,
    NULL::jsonb AS hyperparams,
    NULL::double precision AS test_size,
    NULL::text AS test_sampling,
    NULL::boolean AS automatic_deploy,
    NULL::boolean AS materialize_snapshot,
    NULL::integer AS max_attempts,
    NULL::integer AS priority,
    NULL::bigint AS job_id,
    NULL::text AS status,
    NULL::bigint AS project_id,
    NULL::bigint AS model_id
  WHERE false;
CREATE TRIGGER tune_requests_insert INSTEAD OF INSERT ON pgml.tune_requests FOR EACH ROW EXECUTE FUNCTION pgml._tune_request();
GRANT INSERT, SELECT ON VIEW pgml.tune_requests TO pgml_user;

-- view pgml.worker_status, owner pgml_owner
CREATE VIEW pgml.worker_status WITH (security_barrier=true) AS
 SELECT id,
    host,
    pid,
    version,
        CASE
            WHEN stopped_at IS NOT NULL THEN 'stopped'::text
            WHEN (clock_timestamp() - heartbeat_at) > make_interval(secs => lease_seconds::double precision) THEN 'gone'::text
            WHEN (clock_timestamp() - heartbeat_at) > make_interval(secs => 2::double precision * heartbeat_seconds) THEN 'late'::text
            ELSE 'live'::text
        END AS state,
    round(EXTRACT(epoch FROM clock_timestamp() - heartbeat_at), 1) AS heartbeat_age,
    gpus,
    devices,
    concurrency,
    free_slots,
    free_gpus,
        CASE
            WHEN pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text) THEN running
            ELSE ARRAY( SELECT j.id
               FROM pgml.jobs j
              WHERE (j.id = ANY (running)) AND j.submitted_by = SESSION_USER
              ORDER BY j.id)
        END AS running,
        CASE
            WHEN pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text) THEN models_cached
            ELSE NULL::jsonb
        END AS models_cached,
    started_at,
    heartbeat_at,
    stopped_at,
        CASE
            WHEN pg_has_role(SESSION_USER, 'pgml_admin'::name, 'MEMBER'::text) OR pg_has_role(SESSION_USER, 'pgml_worker'::name, 'MEMBER'::text) THEN serving
            ELSE NULL::jsonb
        END AS serving
   FROM pgml.workers w;
GRANT SELECT ON VIEW pgml.worker_status TO pgml_admin;
GRANT SELECT ON VIEW pgml.worker_status TO pgml_user;
GRANT SELECT ON VIEW pgml.worker_status TO pgml_worker;

-- table pgml.workers, owner pgml_owner
CREATE TABLE pgml.workers (
    id text NOT NULL,
    login name NOT NULL,
    token_hash bytea NOT NULL,
    host text NOT NULL,
    pid integer,
    version text NOT NULL,
    devices jsonb DEFAULT '[]'::jsonb NOT NULL,
    gpus integer DEFAULT 0 NOT NULL,
    concurrency integer NOT NULL,
    free_slots integer NOT NULL,
    free_gpus integer DEFAULT 0 NOT NULL,
    running bigint[] DEFAULT '{}'::bigint[] NOT NULL,
    models_cached jsonb DEFAULT '[]'::jsonb NOT NULL,
    heartbeat_seconds real NOT NULL,
    lease_seconds real NOT NULL,
    started_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    stopped_at timestamp with time zone,
    cpus integer,
    serving jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT workers_pkey PRIMARY KEY (id)
);


-- ==== functions and procedures ====

-- FUNCTION pgml._async_commit(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._async_commit()
 RETURNS boolean
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL $function$;
GRANT EXECUTE ON FUNCTION pgml._async_commit() TO pgml_worker;

-- FUNCTION pgml._auto_deploy(p_model_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._auto_deploy(p_model_id bigint)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._await_answer(p_id bigint, p_timeout double precision, OUT result jsonb, OUT vectors real[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._await_answer(p_id bigint, p_timeout double precision, OUT result jsonb, OUT vectors real[])
 RETURNS record
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_start   timestamptz := pg_catalog.clock_timestamp();
    v_local   boolean := pg_catalog.current_setting('transaction_isolation') = 'read committed';
    v_status  text;
    v_worker  text;
    v_answer  jsonb;
    v_error   text;
    v_elapsed double precision;
    v_lock_timeout text := pg_catalog.current_setting('lock_timeout');
    v_got_lock boolean := false;  -- the last turn took the request's lock: if it is still running, nobody holds it
BEGIN
    BEGIN
        LOOP
            IF v_local THEN
                SELECT r.status, r.claimed_by INTO v_status, v_worker FROM pgml.requests r WHERE r.id = p_id;
            ELSE  -- a snapshot that cannot see the answer: ask through the loopback (a finished one is taken)
                v_answer := pgml._loopback(pgml._quick(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id)));
                v_status := v_answer ->> 'status';
            END IF;
            EXIT WHEN v_status IS NULL OR v_status IN ('done', 'failed');
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
            IF v_elapsed > p_timeout THEN
                PERFORM pgml._loopback(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
                IF v_status = 'queued' THEN
                    RAISE EXCEPTION 'no pgml-tuned worker is serving: the request waited % s and nobody took it',
                        round(v_elapsed::numeric, 1)
                        USING ERRCODE = 'lock_not_available',
                              HINT = 'start one (pgml-tuned serve) or check SELECT * FROM pgml.queue_summary; '
                                     'args => ''{"timeout": 120}'' waits longer';
                END IF;
                RAISE EXCEPTION 'the request timed out after % s while % was answering it',
                    round(v_elapsed::numeric, 1), coalesce(v_worker, 'a worker')
                    USING ERRCODE = 'query_canceled',
                          HINT = 'args => ''{"timeout": 300}'' waits longer (long generations need it)';
            END IF;
            IF v_local AND v_status = 'running' AND NOT v_got_lock THEN
                -- the serving process holds this lock from its claim until its answer is committed: wait on it
                -- instead of polling (no CPU spent, woken the moment the answer is there), a quarter of a second
                -- at a time at most (then the status is read again: a request taken over after a lost lease has
                -- a new holder; anyone may take advisory locks, so a lock held by someone else costs that much)
                PERFORM pg_catalog.set_config('lock_timeout', pg_catalog.format('%sms',
                    greatest(1, least(250, ((p_timeout - coalesce(v_elapsed, 0)) * 1000)::integer))), true);
                BEGIN
                    PERFORM pg_catalog.pg_advisory_lock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                    PERFORM pg_catalog.pg_advisory_unlock_shared(pgml._request_lock_space(), pgml._request_lock_key(p_id));
                    v_got_lock := true;
                EXCEPTION WHEN lock_not_available THEN
                    NULL;
                END;
                PERFORM pg_catalog.set_config('lock_timeout', v_lock_timeout, true);
            ELSE
                -- queued, or running with nobody holding its lock (its serving process's lane connection broke: the
                -- locks went with it, and the lease runs out before another claims it): poll, then try the lock
                -- again (a new holder's), rather than take a free lock in a tight loop
                PERFORM pg_catalog.pg_sleep(CASE WHEN v_elapsed IS NULL OR v_elapsed < 0.05 THEN 0.001
                                                 WHEN v_elapsed < 1 THEN 0.005 ELSE 0.02 END);
                v_got_lock := false;
            END IF;
            v_elapsed := extract(epoch FROM pg_catalog.clock_timestamp() - v_start);
        END LOOP;
    EXCEPTION WHEN query_canceled THEN
        -- statement_timeout or a cancel: leave nothing behind
        PERFORM pgml._loopback(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
        RAISE;
    END;
    IF v_local AND v_status IS NOT NULL THEN
        -- read here (this statement sees the serving process's commit), and only deleted through the
        -- loopback: an answer of 1,000 vectors is not printed, sent over the loopback and parsed again. The
        -- deletion is sent without waiting for it (pgml._loopback_send): the caller has its answer now
        SELECT r.status, r.result, r.vectors, r.error INTO v_status, result, vectors, v_error
        FROM pgml.requests r WHERE r.id = p_id;
        IF FOUND THEN
            PERFORM pgml._loopback_send(pgml._quick(format('to_jsonb(pgml._request_abandon(%s))', p_id)));
        END IF;
    ELSE
        IF v_local OR v_status IS NULL THEN
            v_answer := pgml._loopback(pgml._quick(format('(SELECT to_jsonb(a) FROM pgml._request_answer(%s) a)', p_id)));
        END IF;
        v_status := v_answer ->> 'status';
        result := v_answer -> 'result';
        v_error := v_answer ->> 'error';
    END IF;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'request % is gone (it expired, or its serving process failed it twice)', p_id
            USING ERRCODE = 'no_data_found', HINT = 'try again; pgml-tuned status shows the serving workers';
    END IF;
    IF v_status = 'failed' THEN
        RAISE EXCEPTION '%', v_error USING ERRCODE = 'data_exception';
    END IF;
END $function$;

-- FUNCTION pgml._await_request(p_id bigint, p_timeout double precision), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._await_request(p_id bigint, p_timeout double precision)
 RETURNS jsonb
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT a.result FROM pgml._await_answer(p_id, p_timeout) a
$function$;

-- FUNCTION pgml._bytea_to_numeric(b bytea), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._bytea_to_numeric(b bytea)
 RETURNS numeric
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v     numeric := 0;
    len   integer := length(b);
    pos   integer := 0;       -- bytes consumed
    step  integer;
BEGIN
    WHILE pos < len LOOP
        step := least(7, len - pos);
        v := v * (1::bigint << (8 * step))
             + ('x' || lpad(encode(substring(b FROM pos + 1 FOR step), 'hex'), 16, '0'))::bit(64)::bigint;
        pos := pos + step;
    END LOOP;
    RETURN v;
END $function$;

-- FUNCTION pgml._check_column(rel regclass, arg text, col text, want_text boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_column(rel regclass, arg text, col text, want_text boolean)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._check_job_limits(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_job_limits()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._check_output_table(p_name text, who name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_output_table(p_name text, who name)
 RETURNS void
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._check_resources(hyperparams jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_resources(hyperparams jsonb)
 RETURNS void
 LANGUAGE plpgsql
 IMMUTABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._check_retrieval_args(task text, rel regclass, dargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_retrieval_args(task text, rel regclass, dargs jsonb)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._check_retrieval_rows(job pgml.jobs), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._check_retrieval_rows(job pgml.jobs)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._child_checkpoint_begin(job_id bigint, ticket text, step bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_checkpoint_begin(job_id bigint, ticket text, step bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    -- no row lock (see above): the ticket is checked now, and again under the lock by _child_checkpoint_end
    v pgml.jobs := pgml._child_job(_child_checkpoint_begin.job_id, ticket, false);
    v_id bigint;
BEGIN
    DELETE FROM pgml.checkpoints c WHERE c.job_id = v.id AND c.step = _child_checkpoint_begin.step;
    INSERT INTO pgml.checkpoints (job_id, attempt, step) VALUES (v.id, v.attempt, _child_checkpoint_begin.step)
    RETURNING id INTO v_id;
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_checkpoint_begin(job_id bigint, ticket text, step bigint) TO pgml_child;

-- FUNCTION pgml._child_checkpoint_end(job_id bigint, ticket text, checkpoint_id bigint, keep integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_checkpoint_end(job_id bigint, ticket text, checkpoint_id bigint, keep integer)
 RETURNS TABLE(bytes bigint, max_bytes bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs := pgml._child_job(_child_checkpoint_end.job_id, ticket, true);
BEGIN
    UPDATE pgml.checkpoints c
    SET files = s.files, bytes = s.bytes
    FROM (SELECT count(DISTINCT f.path) AS files, coalesce(sum(length(f.data)), 0) AS bytes
          FROM pgml.checkpoint_files f WHERE f.checkpoint_id = _child_checkpoint_end.checkpoint_id) s
    WHERE c.id = _child_checkpoint_end.checkpoint_id AND c.job_id = v.id;
    DELETE FROM pgml.checkpoints c
    WHERE c.job_id = v.id
      AND c.id NOT IN (SELECT k.id FROM pgml.checkpoints k WHERE k.job_id = v.id
                       ORDER BY k.step DESC LIMIT greatest(1, keep));
    RETURN QUERY
    SELECT coalesce(sum(c.bytes), 0)::bigint, v.max_checkpoint_bytes FROM pgml.checkpoints c WHERE c.job_id = v.id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_checkpoint_end(job_id bigint, ticket text, checkpoint_id bigint, keep integer) TO pgml_child;

-- FUNCTION pgml._child_checkpoint_files(job_id bigint, ticket text, checkpoint_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_checkpoint_files(job_id bigint, ticket text, checkpoint_id bigint)
 RETURNS TABLE(path text, part integer, data bytea)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._child_reader(_child_checkpoint_files.job_id, ticket);
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.checkpoint_files f JOIN pgml.checkpoints c ON c.id = f.checkpoint_id
    WHERE f.checkpoint_id = _child_checkpoint_files.checkpoint_id AND c.job_id = _child_checkpoint_files.job_id
    ORDER BY f.path, f.part;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_checkpoint_files(job_id bigint, ticket text, checkpoint_id bigint) TO pgml_child;

-- FUNCTION pgml._child_files_begin(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_files_begin(job_id bigint, ticket text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs := pgml._child_job(_child_files_begin.job_id, ticket, true);
BEGIN
    DELETE FROM pgml.file_parts f WHERE f.model_id = v.model_id;
    -- what pgml._child_remember sets: the file tables' insert trigger checks every row against them
    PERFORM pg_catalog.set_config('pgml.child_job', v.id::text, true),
            pg_catalog.set_config('pgml.child_ticket', ticket, true);
    RETURN v.model_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_files_begin(job_id bigint, ticket text) TO pgml_child;

-- FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text)
 RETURNS TABLE(id bigint, status text, base_model text, task text, project_name text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_owner name := (pgml._child_reader(_child_find_model.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_child_find_model.model_id IS NOT NULL AND m.id = _child_find_model.model_id)
           OR (_child_find_model.model_id IS NULL AND p.name = project AND m.status = 'successful'
               AND p.task IN ('text-classification', 'text-pair-classification', 'conversation',
                              'text-embedding', 'text-ranking')))
      AND pgml._may_read_model(m.owner, v_owner)
    ORDER BY (p.owner = v_owner) DESC, (m.id = pgml._deployed_model(p.id)) DESC, m.id DESC
    LIMIT 1;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text) TO pgml_child;

-- FUNCTION pgml._child_insert_check(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_insert_check()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs;
    v_job text := pg_catalog.current_setting('pgml.child_job', true);
BEGIN
    IF pg_catalog.pg_has_role(session_user, 'pgml_owner', 'MEMBER') THEN
        RETURN NEW;
    END IF;
    -- an import this transaction began (76_imports.sql): its importer stores the files of that model only, while
    -- it is 'in_progress' (no import stays so past its COMMIT: models_import_finished)
    IF TG_TABLE_NAME = 'file_parts' AND coalesce(v_job, '') = ''
       AND pg_catalog.current_setting('pgml.import_model', true) IS NOT NULL
       AND pg_catalog.current_setting('pgml.import_model', true) <> '' THEN
        IF NOT EXISTS (SELECT 1 FROM pgml.models m
                       WHERE m.id = NEW.model_id
                         AND m.id::text = pg_catalog.current_setting('pgml.import_model', true)
                         AND m.status = 'in_progress' AND m.hyperparams ? 'import'
                         AND m.hyperparams -> 'import' ->> 'by' = pgml._submitter()::text) THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = pg_catalog.format('an import may store files of the model it began only, not of model %s',
                                            NEW.model_id),
                HINT = 'pgml.import_model_begin returns the model id to store files for';
        END IF;
        RETURN NEW;
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' AND NOT pg_catalog.pg_has_role(session_user, 'pgml_child', 'MEMBER') THEN
        -- a user (pgml_user may INSERT into file_parts for its imports, above): no write of its own
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('permission denied for table %s: a user stores a model''s files only in an '
                                        'import it began', TG_TABLE_NAME),
            HINT = 'pgml-tuned models import DIR --project NAME (or pgml.import_model_begin, COPY, '
                   'pgml.import_model_finish in one transaction)';
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01', MESSAGE = pg_catalog.format('%s: no child ticket in this transaction',
                                                                             TG_TABLE_NAME),
            HINT = 'a child stores files after pgml._child_files_begin or pgml._child_checkpoint_begin';
    END IF;
    v := pgml._child_job(v_job::bigint, pg_catalog.current_setting('pgml.child_ticket', true));
    IF TG_TABLE_NAME = 'file_parts' THEN
        IF NEW.model_id IS DISTINCT FROM v.model_id THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = pg_catalog.format('job %s may store files of its own model (%s) only, not of model %s',
                                            v.id, v.model_id, NEW.model_id);
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM pgml.checkpoints c WHERE c.id = NEW.checkpoint_id AND c.job_id = v.id) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('job %s may store files of its own checkpoints only, not of checkpoint %s',
                                        v.id, NEW.checkpoint_id);
    END IF;
    RETURN NEW;
END $function$;

-- FUNCTION pgml._child_job(job_id bigint, ticket text, for_update boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_job(job_id bigint, ticket text, for_update boolean DEFAULT false)
 RETURNS pgml.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs;
    v_hash bytea := pg_catalog.sha256(pg_catalog.convert_to(coalesce(ticket, ''), 'UTF8'));
BEGIN
    IF for_update THEN
        SELECT * INTO v FROM pgml.jobs j
        WHERE j.id = _child_job.job_id AND j.status = 'running' AND j.child_ticket = v_hash
        FOR NO KEY UPDATE;
    ELSE
        SELECT * INTO v FROM pgml.jobs j
        WHERE j.id = _child_job.job_id AND j.status = 'running' AND j.child_ticket = v_hash;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = pg_catalog.format('job %s: this ticket is not its running attempt''s', _child_job.job_id),
            HINT = 'the attempt lost its lease or ended; a child acts only on its own running attempt';
    END IF;
    RETURN v;
END $function$;

-- FUNCTION pgml._child_latest_checkpoint(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_latest_checkpoint(job_id bigint, ticket text)
 RETURNS TABLE(id bigint, step bigint, attempt integer, bytes bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._child_reader(_child_latest_checkpoint.job_id, ticket);
    RETURN QUERY
    SELECT c.id, c.step, c.attempt, c.bytes FROM pgml.checkpoints c
    WHERE c.job_id = _child_latest_checkpoint.job_id ORDER BY c.step DESC LIMIT 1;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_latest_checkpoint(job_id bigint, ticket text) TO pgml_child;

-- FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_log.job_id, _child_log.ticket, true);
    v_inserted bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(logs) IS DISTINCT FROM 'array'
       OR pg_catalog.jsonb_typeof(progress) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log takes a JSON object of progress and a JSON array of log entries';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(_child_log.logs) AS x
               WHERE coalesce(x.value ->> 'kind', 'train') NOT IN ('train', 'info', 'warning')) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log: a log entry''s kind is train, info or warning';
    END IF;
    UPDATE pgml.jobs j SET progress = j.progress || _child_log.progress, updated_at = pg_catalog.clock_timestamp()
    WHERE j.id = v.id;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    SELECT v.model_id, v.project_id, v.id, v.attempt, (x.value ->> 'seq')::integer,
           coalesce(x.value ->> 'kind', 'train'), x.value -> 'entry'
    FROM pg_catalog.jsonb_array_elements(_child_log.logs) WITH ORDINALITY AS x (value, n)
    ORDER BY x.n
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    RETURN v_inserted;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb) TO pgml_child;

-- FUNCTION pgml._child_model_files(job_id bigint, ticket text, model_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_model_files(job_id bigint, ticket text, model_id bigint)
 RETURNS TABLE(path text, part integer, data bytea)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_owner name := (pgml._child_reader(_child_model_files.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.file_parts f
    WHERE f.model_id = _child_model_files.model_id
      AND EXISTS (SELECT 1 FROM pgml.models m
                  WHERE m.id = _child_model_files.model_id AND pgml._may_read_model(m.owner, v_owner))
    ORDER BY f.path, f.part;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_model_files(job_id bigint, ticket text, model_id bigint) TO pgml_child;

-- FUNCTION pgml._child_predictions_begin(job_id bigint, ticket text, restart boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_predictions_begin(job_id bigint, ticket text, restart boolean)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v      pgml.jobs := pgml._child_job(_child_predictions_begin.job_id, ticket, true);
    v_name text := v.hyperparams ->> 'output_table';
BEGIN
    IF v.task NOT IN ('predict_batch', 'embed_batch') THEN
        RAISE EXCEPTION 'job % is not a predict_batch or embed_batch job', v.id USING ERRCODE = 'PGT01';
    END IF;
    PERFORM pgml._check_output_table(v_name, v.submitted_by);
    IF pg_catalog.to_regclass(pg_catalog.format('pgml.%I', v_name)) IS NULL THEN
        EXECUTE pg_catalog.format(CASE v.task WHEN 'embed_batch' THEN 'CREATE TABLE pgml.%I (key text, embedding real[])'
                                  ELSE 'CREATE TABLE pgml.%I (key text, label text, score double precision)' END, v_name);
        EXECUTE pg_catalog.format('CREATE TRIGGER output_child_check BEFORE INSERT ON pgml.%I '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION pgml._output_insert_check()', v_name);
        EXECUTE pg_catalog.format('REVOKE ALL ON pgml.%I FROM PUBLIC', v_name);
        EXECUTE pg_catalog.format('GRANT INSERT ON pgml.%I TO pgml_child', v_name);
    ELSIF restart THEN
        EXECUTE pg_catalog.format('TRUNCATE pgml.%I', v_name);
    END IF;
    EXECUTE pg_catalog.format('GRANT SELECT ON pgml.%I TO %I', v_name, v.submitted_by);
    INSERT INTO pgml.output_tables (name, kind, owner, job_id)
    VALUES (v_name, CASE v.task WHEN 'embed_batch' THEN 'embeddings' ELSE 'predictions' END, v.submitted_by, v.id)
    ON CONFLICT (name) DO UPDATE SET job_id = EXCLUDED.job_id, created_at = pg_catalog.clock_timestamp();
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_name;  -- the table pgml.<v_name>
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_predictions_begin(job_id bigint, ticket text, restart boolean) TO pgml_child;

-- FUNCTION pgml._child_reader(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_reader(job_id bigint, ticket text)
 RETURNS pgml.jobs
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs;
    v_hash bytea := pg_catalog.sha256(pg_catalog.convert_to(coalesce(ticket, ''), 'UTF8'));
BEGIN
    SELECT * INTO v FROM pgml.jobs j
    WHERE j.id = _child_reader.job_id AND j.status = 'running'
      AND (j.child_ticket = v_hash
           OR EXISTS (SELECT 1 FROM pgml.gang_members m
                      WHERE m.job_id = j.id AND m.attempt = j.attempt AND m.child_ticket = v_hash));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = pg_catalog.format('job %s: this ticket is not its running attempt''s', _child_reader.job_id),
            HINT = 'the attempt lost its lease or ended; a child acts only on its own running attempt';
    END IF;
    RETURN v;
END $function$;

-- FUNCTION pgml._child_remember(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_remember(job_id bigint, ticket text)
 RETURNS void
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.set_config('pgml.child_job', job_id::text, true),
           pg_catalog.set_config('pgml.child_ticket', ticket, true)
$function$;

-- FUNCTION pgml._child_resume(job_id bigint, ticket text, step bigint, seq integer, entry jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_resume(job_id bigint, ticket text, step bigint, seq integer, entry jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_resume.job_id, _child_resume.ticket, true);
    v_moved bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(_child_resume.entry) IS DISTINCT FROM 'object' OR _child_resume.step IS NULL
       OR _child_resume.step < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_resume takes a step >= 0 and a JSON object (the info row)';
    END IF;
    WITH moved AS (
        DELETE FROM pgml.logs l
        WHERE l.job_id = v.id AND l.attempt < v.attempt AND l.kind = 'train'
          AND (pg_catalog.jsonb_exists(l.logs, 'train_runtime')
               OR (pg_catalog.jsonb_typeof(l.logs -> 'step') = 'number'
                   AND (l.logs ->> 'step')::numeric > _child_resume.step))
        RETURNING l.*
    )
    INSERT INTO pgml.superseded_logs (id, model_id, project_id, job_id, attempt, seq, created_at, kind, logs,
                                      superseded_by, resumed_from_step)
    SELECT m.id, m.model_id, m.project_id, m.job_id, m.attempt, m.seq, m.created_at, m.kind, m.logs,
           v.attempt, _child_resume.step
    FROM moved m;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    VALUES (v.model_id, v.project_id, v.id, v.attempt, _child_resume.seq, 'info',
            _child_resume.entry || pg_catalog.jsonb_build_object(
                'superseded', v_moved,
                'message', coalesce(_child_resume.entry ->> 'message',
                                    pg_catalog.format('training from step %s', _child_resume.step))
                           || CASE WHEN v_moved > 0 THEN pg_catalog.format(
                                  '; the %s log rows of earlier attempts past step %s are now in pgml.superseded_logs',
                                  v_moved, _child_resume.step) ELSE '' END))
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    RETURN v_moved;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_resume(job_id bigint, ticket text, step bigint, seq integer, entry jsonb) TO pgml_child;

-- FUNCTION pgml._child_rows(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text)
 RETURNS SETOF text[]
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET synchronize_seqscans TO 'off'
AS $function$
DECLARE
    v pgml.jobs := pgml._child_reader(_child_rows.job_id, ticket);
    k integer := coalesce(pg_catalog.cardinality(v.snapshot_columns), 8);
    v_name text := pgml._job_table(_child_rows.job_id);
    v_table regclass;
BEGIN
    v_table := pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', v_name));
    IF v_table IS NOT NULL THEN
        RETURN QUERY EXECUTE pg_catalog.format(
            'SELECT ARRAY[%s] FROM %s%s',
            (SELECT pg_catalog.string_agg(pg_catalog.format('c%s', i), ', ' ORDER BY i)
             FROM pg_catalog.generate_series(1, k) AS i), v_table,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = v_table AND a.attname = 'n' AND NOT a.attisdropped)
                 THEN ' ORDER BY n' ELSE '' END);  -- tables of jobs submitted before 0030 have no n
        RETURN;
    END IF;
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_rows(job_id bigint, ticket text) TO pgml_child;

-- FUNCTION pgml._child_succeed(job_id bigint, ticket text, metrics jsonb, base_model text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._child_succeed(job_id bigint, ticket text, metrics jsonb, base_model text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs := pgml._child_job(_child_succeed.job_id, ticket, true);
BEGIN
    UPDATE pgml.jobs j
    SET status = 'succeeded', metrics = _child_succeed.metrics, finished_at = clock_timestamp(),
        lease_expires_at = NULL, child_ticket = NULL, updated_at = clock_timestamp()
    WHERE j.id = v.id;
    UPDATE pgml.models m
    SET metrics = _child_succeed.metrics, base_model = _child_succeed.base_model, updated_at = clock_timestamp()
    WHERE m.id = v.model_id;
    RETURN v.model_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._child_succeed(job_id bigint, ticket text, metrics jsonb, base_model text) TO pgml_child;

-- FUNCTION pgml._conn_quote(v text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._conn_quote(v text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT '''' || pg_catalog.replace(pg_catalog.replace(v, '\', '\\'), '''', '\''') || ''''
$function$;

-- FUNCTION pgml._dataset_begin(job_id bigint, ticket text, names text[], types text[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_begin(job_id bigint, ticket text, names text[], types text[])
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._dataset_begin(job_id bigint, ticket text, names text[], types text[]) TO pgml_child;

-- FUNCTION pgml._dataset_check_path(what text, path text, absolute_ok boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_check_path(what text, path text, absolute_ok boolean)
 RETURNS void
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._dataset_check_target(name text, who name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_check_target(name text, who name)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._dataset_commit(job_id bigint, ticket text, rows bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_commit(job_id bigint, ticket text, rows bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._dataset_commit(job_id bigint, ticket text, rows bigint) TO pgml_child;

-- FUNCTION pgml._dataset_drop_staging(job_id bigint, keep text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_drop_staging(job_id bigint, keep text DEFAULT NULL::text)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._dataset_job(job_id bigint, ticket text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_job(job_id bigint, ticket text)
 RETURNS pgml.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job pgml.jobs := pgml._child_job(_dataset_job.job_id, ticket, true);  -- the child's ticket (0010)
BEGIN
    IF v_job.task <> 'load_dataset' THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = format('job %s is a %s job, not a load_dataset job', v_job.id, v_job.task);
    END IF;
    RETURN v_job;
END $function$;

-- FUNCTION pgml._dataset_job_ended(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_job_ended()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._dataset_drop_staging(NEW.id);
    RETURN NULL;
END $function$;

-- FUNCTION pgml._dataset_job_inserted(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_job_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
        MESSAGE = 'load_dataset jobs are queued by pgml.load_dataset(), not pgml.tune()',
        HINT = 'SELECT pgml.load_dataset(''imdb''), or pgml.load_dataset_async(...) to get the job id at once';
END $function$;

-- FUNCTION pgml._dataset_kwargs(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_kwargs()
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT ARRAY['split', 'revision', 'data_files', 'data_dir', 'token',
                 -- the csv / json / text builders' options
                 'sep', 'delimiter', 'quotechar', 'header', 'column_names', 'skiprows', 'encoding', 'field',
                 'columns']
$function$;
GRANT EXECUTE ON FUNCTION pgml._dataset_kwargs() TO pgml_child;
GRANT EXECUTE ON FUNCTION pgml._dataset_kwargs() TO pgml_user;

-- FUNCTION pgml._dataset_move_in(staging text, name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_move_in(staging text, name text)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._dataset_result(job_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_result(job_id bigint)
 RETURNS TABLE(table_name text, rows bigint)
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._dataset_result(job_id bigint) TO pgml_user;

-- FUNCTION pgml._dataset_staging(job_id bigint, attempt integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dataset_staging(job_id bigint, attempt integer)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT c.relname::text FROM pg_catalog.pg_class c
    WHERE c.relnamespace = 'pgml_staging'::regnamespace AND c.relkind = 'r'
      AND c.relname ~ pg_catalog.format('^load_%s_%s_[0-9a-f]{16}$', job_id, attempt)
    ORDER BY c.oid DESC LIMIT 1
$function$;

-- FUNCTION pgml._dblink_connections(v_schema name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dblink_connections(v_schema name)
 RETURNS text[]
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v text[];
BEGIN
    EXECUTE format('SELECT %I.dblink_get_connections()', v_schema) INTO v;
    RETURN coalesce(v, '{}');
END $function$;

-- FUNCTION pgml._dblink_schema(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._dblink_schema()
 RETURNS name
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'dblink'
$function$;

-- FUNCTION pgml._deployed_model(p_project_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._deployed_model(p_project_id bigint)
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT d.model_id FROM pgml.deployments d WHERE d.project_id = p_project_id ORDER BY d.id DESC LIMIT 1
$function$;

-- FUNCTION pgml._drop_unlocked(schema_name text, table_name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._drop_unlocked(schema_name text, table_name text)
 RETURNS boolean
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET lock_timeout TO '10ms'
AS $function$
BEGIN
    EXECUTE pg_catalog.format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE NOWAIT', schema_name, table_name);
    EXECUTE pg_catalog.format('DROP TABLE %I.%I', schema_name, table_name);
    RETURN true;
EXCEPTION
    WHEN lock_not_available THEN
        RETURN false;
    WHEN undefined_table THEN
        RETURN true;  -- dropped meanwhile
END $function$;

-- FUNCTION pgml._embedded(transformer text, kwargs jsonb, inputs text[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._embedded(transformer text, kwargs jsonb, inputs text[])
 RETURNS SETOF real[]
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_answer  record;
    v_vectors real[];
    v_dim     integer;
BEGIN
    SELECT a.result, a.vectors INTO v_answer
    FROM pgml._await_answer(pgml._serve_submit('embed', transformer, kwargs, pg_catalog.to_jsonb(inputs)),
                            pgml._request_timeout(kwargs)) a;
    IF v_answer.vectors IS NULL THEN
        RETURN QUERY SELECT v FROM pgml._vectors(v_answer.result) v;
        RETURN;
    END IF;
    v_vectors := v_answer.vectors;
    v_dim := pg_catalog.cardinality(v_vectors) OPERATOR(pg_catalog./) pg_catalog.cardinality(inputs);
    RETURN QUERY
    SELECT v_vectors[(i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) v_dim OPERATOR(pg_catalog.+) 1
                     : i OPERATOR(pg_catalog.*) v_dim]
    FROM pg_catalog.generate_series(1, pg_catalog.cardinality(inputs)) AS i
    ORDER BY i;
END $function$;

-- FUNCTION pgml._fail(message text, hint text, code text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._fail(message text, hint text, code text DEFAULT 'invalid_parameter_value'::text)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, HINT = hint, ERRCODE = code;
END $function$;

-- FUNCTION pgml._fleet_shortfall(gpus integer, nodes integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._fleet_shortfall(gpus integer, nodes integer)
 RETURNS text
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_live bigint;
    v_able bigint;
    v_most integer;
BEGIN
    SELECT count(*), max(w.gpus), count(*) FILTER (WHERE w.gpus >= _fleet_shortfall.gpus)
    INTO v_live, v_most, v_able
    FROM pgml.worker_status w WHERE w.state IN ('live', 'late');
    IF v_live = 0 THEN
        RETURN 'no live pgml-tuned worker is registered (pgml.worker_status)';
    END IF;
    IF _fleet_shortfall.gpus > coalesce(v_most, 0) THEN
        RETURN format('it asks for %s GPU%s and no live worker has that many (%s live, the most GPUs on one: %s)',
                      _fleet_shortfall.gpus, CASE WHEN _fleet_shortfall.gpus = 1 THEN '' ELSE 's' END, v_live,
                      coalesce(v_most, 0));
    END IF;
    IF coalesce(_fleet_shortfall.nodes, 1) > v_able THEN
        RETURN format('it asks for %s workers at once (resources.nodes) and %s live worker%s could run %s part',
                      _fleet_shortfall.nodes, v_able, CASE WHEN v_able = 1 THEN '' ELSE 's' END,
                      CASE WHEN v_able = 1 THEN 'its' ELSE 'a' END);
    END IF;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._gc_candidates(keep_last integer, cutoff timestamp with time zone, include_kept boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._gc_candidates(keep_last integer, cutoff timestamp with time zone, include_kept boolean)
 RETURNS TABLE(kind text, project text, job_id bigint, model_id bigint, items bigint, bytes bigint, note text)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    WITH successful AS (
        SELECT m.id, m.project_id, m.task, m.metrics,
               pg_catalog.row_number() OVER (PARTITION BY m.project_id ORDER BY m.id DESC) AS newest
        FROM pgml.models m WHERE m.status = 'successful'
    ), best AS (
        SELECT DISTINCT ON (s.project_id) s.id
        FROM successful s, LATERAL pgml._key_metric(s.metrics, s.task) k
        WHERE k.value IS NOT NULL
        ORDER BY s.project_id, CASE WHEN k.higher THEN -k.value ELSE k.value END, s.id DESC
    ), referenced AS (
        SELECT pg_catalog.substring(m.base_model, '^pgml:model:([0-9]+)$')::bigint AS id FROM pgml.models m
        UNION
        SELECT pg_catalog.substring(j.model_name, '^pgml:model:([0-9]+)$')::bigint FROM pgml.jobs j
        WHERE j.status IN ('queued', 'running')
    ), ended AS (
        SELECT j.id, j.project_id, j.keep_snapshot FROM pgml.jobs j
        WHERE j.status IN ('succeeded', 'failed', 'cancelled') AND (include_kept OR NOT j.keep_snapshot)
    )
    SELECT 'model_files', p.name, NULL::bigint, s.id, f.parts, f.bytes,
           pg_catalog.format('model %s (#%s newest of its project): not deployed, not the best', s.id, s.newest)
    FROM successful s
    JOIN pgml.projects p ON p.id = s.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS parts, coalesce(pg_catalog.sum(pg_catalog.length(fp.data)), 0)::bigint AS bytes
                        FROM pgml.file_parts fp WHERE fp.model_id = s.id) f
    WHERE s.newest > greatest(keep_last, 1)
      AND s.id IS DISTINCT FROM pgml._deployed_model(s.project_id)
      AND s.id NOT IN (SELECT b.id FROM best b)
      AND s.id NOT IN (SELECT r.id FROM referenced r WHERE r.id IS NOT NULL)
      AND f.parts > 0
    UNION ALL
    SELECT 'logs', p.name, NULL::bigint, l.model_id, l.n, l.bytes,
           pg_catalog.format('log rows before %s', cutoff)
    FROM (SELECT lg.model_id, pg_catalog.count(*) AS n, pg_catalog.sum(pg_catalog.pg_column_size(lg.*))::bigint AS bytes
          FROM pgml.logs lg
          WHERE cutoff IS NOT NULL AND lg.created_at < cutoff
          GROUP BY lg.model_id) l
    JOIN pgml.models m ON m.id = l.model_id AND m.status <> 'in_progress'
    JOIN pgml.projects p ON p.id = m.project_id
    UNION ALL
    SELECT 'checkpoints', p.name, e.id, NULL::bigint, c.n, c.bytes,
           CASE WHEN e.keep_snapshot THEN 'kept by materialize_snapshot' ELSE 'left by an ended job' END
    FROM ended e
    JOIN pgml.projects p ON p.id = e.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(ck.bytes), 0)::bigint AS bytes
                        FROM pgml.checkpoints ck WHERE ck.job_id = e.id) c
    WHERE c.n > 0
    UNION ALL
    SELECT 'job_rows', p.name, e.id, NULL::bigint, r.n, r.bytes,
           CASE WHEN e.keep_snapshot THEN 'kept by materialize_snapshot' ELSE 'left by an ended job' END
    FROM ended e
    JOIN pgml.projects p ON p.id = e.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(pg_catalog.pg_column_size(jr.*)), 0)::bigint AS bytes
                        FROM pgml.job_rows jr WHERE jr.job_id = e.id) r
    WHERE r.n > 0
$function$;

-- FUNCTION pgml._guard_schema(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._guard_schema()
 RETURNS event_trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._hub_pattern_matches(pattern text, model_name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._hub_pattern_matches(pattern text, model_name text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE WHEN right(pattern, 1) = '*' THEN starts_with(lower(model_name), lower(left(pattern, -1)))
                ELSE lower(model_name) = lower(pattern) END
$function$;

-- FUNCTION pgml._hub_refusal(model_name text, owner name, task text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._hub_refusal(model_name text, owner name, task text DEFAULT NULL::text)
 RETURNS TABLE(message text, hint text, error text)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_name  text := _hub_refusal.model_name;
    v_ref   text;
    v_base  text;
    v_found boolean;
    v_list  text;
    v_count bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgml.hub_allowlist) THEN
        RETURN;  -- the default: every hub model may be used
    END IF;
    IF _hub_refusal.task IS NOT NULL
       AND NOT coalesce((SELECT t.loads_model FROM pgml.tasks t WHERE t.name = _hub_refusal.task), true) THEN
        RETURN;
    END IF;
    FOR hop IN 1..32 LOOP  -- a chain of stored models ends at a hub id, a directory or a full model
        IF pgml._is_hub_id(v_name) THEN
            IF pgml.hub_model_allowed(v_name) THEN
                RETURN;
            END IF;
            SELECT string_agg(quote_literal(s.pattern), ', ' ORDER BY s.pattern), max(s.n)
            INTO v_list, v_count
            FROM (SELECT a.pattern, count(*) OVER () AS n FROM pgml.hub_allowlist a ORDER BY a.pattern LIMIT 20) s;
            message := format('hub model %L%s is not on the allow-list of hub models (pgml.hub_allowlist)', v_name,
                              CASE WHEN v_name IS DISTINCT FROM _hub_refusal.model_name
                                   THEN format(', the base model of %L,', _hub_refusal.model_name) ELSE '' END);
            hint := format('allowed: %s%s; use one of those, or ask an administrator to add it: '
                           'SELECT pgml.hub_allow(%L)', v_list,
                           CASE WHEN v_count > 20 THEN format(' and %s more (SELECT pattern FROM pgml.hub_allowlist)',
                                                              v_count - 20) ELSE '' END,
                           lower(v_name));
            error := format('%s (%s)', message, hint);
            RETURN NEXT;
            RETURN;
        END IF;
        IF v_name IS NULL OR NOT starts_with(v_name, 'pgml:') THEN
            RETURN;  -- a directory on the workers (the operator put it there), or nothing
        END IF;
        v_ref := substr(v_name, 6);
        IF starts_with(v_ref, 'model:') THEN
            IF substr(v_ref, 7) !~ '^[0-9]{1,18}$' THEN
                RETURN;  -- not a model id: the worker refuses the name itself
            END IF;
            SELECT true, r.base_model INTO v_found, v_base FROM pgml._model_ref(substr(v_ref, 7)::bigint, NULL, _hub_refusal.owner) r;
        ELSE
            SELECT true, r.base_model INTO v_found, v_base FROM pgml._model_ref(NULL, v_ref, _hub_refusal.owner) r;
        END IF;
        IF NOT coalesce(v_found, false) THEN
            RETURN;  -- no such model for this owner: the worker says so
        END IF;
        v_name := v_base;  -- a LoRA adapter loads onto its recorded base; a full model has none
        v_found := NULL;
    END LOOP;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._hub_refusal(model_name text, owner name, task text) TO pgml_child;
GRANT EXECUTE ON FUNCTION pgml._hub_refusal(model_name text, owner name, task text) TO pgml_serving;

-- FUNCTION pgml._import_file_refusal(path text, OUT message text, OUT hint text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._import_file_refusal(path text, OUT message text, OUT hint text)
 RETURNS record
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_name   text := lower(regexp_replace(coalesce(path, ''), '^.*/', ''));
    v_suffix text := CASE WHEN strpos(v_name, '.') > 0 THEN regexp_replace(v_name, '^.*\.', '') END;
BEGIN
    IF path IS NULL OR path = '' OR length(path) > 1024 OR starts_with(path, '/') OR path ~ '[\\[:cntrl:]]'
       OR '..' = ANY (string_to_array(path, '/')) OR '' = ANY (string_to_array(path, '/')) THEN
        message := format('file %L is not a relative path inside the model directory', path);
        hint := 'a model''s files are named by their paths relative to its directory, without "..", "//" or "\"';
    ELSIF v_suffix IN ('bin', 'pt', 'pth', 'pkl', 'pickle', 'ckpt', 'joblib', 'npy', 'npz') THEN
        message := format('file %L is a pickle file: pickled weights can run code when they are loaded, so only '
                          'safetensors weights are imported', path);
        hint := CASE WHEN v_name = 'training_args.bin' OR v_name LIKE 'optimizer.%' OR v_name LIKE 'scheduler.%'
                          OR v_name LIKE 'rng_state%'
                     THEN format('%s is not part of the model (a training state file): delete it', path)
                     ELSE format('convert it to safetensors and delete %s: python -c "from transformers import '
                                 'AutoModel; AutoModel.from_pretrained(''DIR'').save_pretrained(''DIR'', '
                                 'safe_serialization=True)" (AutoModelFor... of its kind)', path) END;
    ELSIF v_suffix IN ('py', 'pyc', 'pyo', 'so', 'dll', 'dylib', 'sh', 'exe') THEN
        message := format('file %L is code: models that need their own code (trust_remote_code) are not imported',
                          path);
        hint := 'import a model whose architecture transformers has built in, without the code files';
    ELSIF v_suffix IN ('h5', 'msgpack', 'onnx', 'gguf', 'ggml', 'tflite', 'ot', 'keras') THEN
        message := format('file %L holds weights in a format pgml-tuned does not load (safetensors only)', path);
        hint := 'save the model with transformers as safetensors (save_pretrained(DIR, safe_serialization=True)), '
                'or delete the file if the directory has safetensors weights too';
    END IF;
END $function$;

-- FUNCTION pgml._import_file_text(p_model_id bigint, p_path text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._import_file_text(p_model_id bigint, p_path text)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT convert_from(string_agg(f.data, ''::bytea ORDER BY f.part), 'UTF8')
    FROM pgml.file_parts f WHERE f.model_id = p_model_id AND f.path = p_path
$function$;

-- FUNCTION pgml._import_finished(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._import_finished()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = NEW.id AND m.status = 'in_progress') THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('the import of model %s was not finished: nothing of it is kept', NEW.id),
            HINT = format('call SELECT * FROM pgml.import_model_finish(%s) after storing its files, before COMMIT',
                          NEW.id);
    END IF;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._is_hub_id(model_name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._is_hub_id(model_name text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT model_name IS NOT NULL AND btrim(model_name) <> ''
       AND NOT (starts_with(model_name, 'pgml:') OR starts_with(model_name, '/') OR starts_with(model_name, './')
                OR starts_with(model_name, '~'))
$function$;

-- FUNCTION pgml._job_changed(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_changed()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NEW.status = 'submitting' THEN
        RETURN NULL;  -- pgml.tune() is still copying its rows: the job is born when it becomes queued
    END IF;
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.attempt IS DISTINCT FROM OLD.attempt THEN
        INSERT INTO pgml.job_events (job_id, attempt, worker, old_status, new_status, lease_expires_at)
        VALUES (NEW.id, NEW.attempt, NEW.worker,
                CASE WHEN TG_OP = 'UPDATE' AND OLD.status <> 'submitting' THEN OLD.status END,
                NEW.status, NEW.lease_expires_at);
        -- clients LISTEN pgml_job_status to follow jobs without polling: a wake-up naming nothing (anyone may
        -- LISTEN on any channel), after which a waiter reads its own jobs' rows (row-level security)
        PERFORM pg_catalog.pg_notify('pgml_job_status', '{"type": "job_status"}');
    END IF;
    -- workers LISTEN pgml_jobs: a job that becomes queued (submitted, requeued, reaped) wakes one at once. The
    -- nonce names nothing; it keeps the notices of one transaction apart (PostgreSQL folds identical ones into one),
    -- so k jobs queued at once still wake the herd control's claimers k times.
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_catalog.pg_notify('pgml_jobs', pg_catalog.json_build_object(
            'type', 'job_queued', 'nonce', pg_catalog.gen_random_uuid())::text);
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
END $function$;

-- FUNCTION pgml._job_deleted(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_deleted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    DELETE FROM pgml.job_rows r USING gone g WHERE r.job_id = g.id;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_end_line(job_id bigint, status text, metrics jsonb, error text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_end_line(job_id bigint, status text, metrics jsonb, error text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.format('job %s %s', job_id, status)
           || coalesce(': ' || nullif(pgml._log_pairs(metrics, ARRAY['eval_loss'],
                                                      ARRAY['epoch', 'step', 'max_steps', 'total_flos', 'eval_runtime',
                                                            'eval_samples_per_second', 'eval_steps_per_second',
                                                            'train_runtime', 'train_samples_per_second',
                                                            'train_steps_per_second']
                                                      || CASE WHEN coalesce(metrics ->> 'world_size', '1') = '1'
                                                              THEN ARRAY['world_size'] ELSE ARRAY[]::text[] END,
                                                      ', '), ''), '')
           || coalesce(' (' || error || ')', '')
$function$;
GRANT EXECUTE ON FUNCTION pgml._job_end_line(job_id bigint, status text, metrics jsonb, error text) TO pgml_user;

-- FUNCTION pgml._job_follow(job_id bigint, after_log bigint, said text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_follow(job_id bigint, after_log bigint, said text)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._job_follow(job_id bigint, after_log bigint, said text) TO pgml_user;

-- FUNCTION pgml._job_hub_check(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_hub_check()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status = 'submitting' OR NEW.model_name IS DISTINCT FROM OLD.model_name THEN
        PERFORM pgml._refuse_hub_model(NEW.model_name, NEW.submitted_by, NEW.task);
    END IF;
    RETURN NEW;
END $function$;

-- FUNCTION pgml._job_logged(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_logged()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_kind text := 'info';
    v_event text;
    v_message text;
    v_last jsonb := NEW.errors -> -1;  -- the latest attempt's error, if it failed
BEGIN
    IF OLD.status = 'submitting' OR (NEW.status IS NOT DISTINCT FROM OLD.status
                                     AND NEW.attempt IS NOT DISTINCT FROM OLD.attempt) THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 'running' AND NEW.attempt > OLD.attempt THEN
        IF OLD.attempt > 0 AND NEW.failed_attempts > 0 AND (v_last ->> 'attempt')::integer = OLD.attempt THEN
            v_event := 'taken_over';
            v_message := pg_catalog.format('taken over by worker %s (attempt %s) after worker %s stopped renewing '
                                           'its lease', NEW.worker, NEW.attempt, v_last ->> 'worker');
        ELSE
            v_event := 'claimed';
            v_message := pg_catalog.format('claimed by worker %s (attempt %s)', NEW.worker, NEW.attempt);
        END IF;
    ELSIF OLD.status = 'running' AND NEW.status = 'queued' AND NEW.failed_attempts > OLD.failed_attempts THEN
        v_kind := 'warning';
        v_event := 'lease_expired';
        v_message := pg_catalog.format('worker %s stopped renewing its lease (killed, crashed or cut off; last '
                                       'heartbeat %s): attempt %s is over, the job is back in the queue (%s of %s '
                                       'attempts failed)', OLD.worker, OLD.heartbeat_at, OLD.attempt,
                                       NEW.failed_attempts, NEW.max_attempts);
    ELSIF OLD.status = 'running' AND NEW.status = 'queued' THEN
        v_event := 'requeued';
        v_message := pg_catalog.format('requeued by worker %s: attempt %s stopped before the end; the next attempt '
                                       'resumes from the job''s latest checkpoint', OLD.worker, OLD.attempt);
    ELSIF NEW.status = 'failed' THEN
        v_kind := 'error';
        v_event := 'failed';
        v_message := pg_catalog.format('failed: %s', coalesce(NEW.error, v_last ->> 'error', 'no reason recorded'));
    ELSIF NEW.status = 'cancelled' THEN
        v_event := 'cancelled';
        v_message := CASE WHEN OLD.status = 'running'
                          THEN pg_catalog.format('cancelled while worker %s ran attempt %s', OLD.worker, OLD.attempt)
                          ELSE 'cancelled before it started' END
                     || coalesce(' (' || NEW.error || ')', '');
    ELSIF NEW.status = 'succeeded' THEN
        v_event := 'succeeded';
        v_message := pg_catalog.format('succeeded (attempt %s, worker %s)', NEW.attempt, OLD.worker);
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, kind, logs)
    VALUES (NEW.model_id, NEW.project_id, NEW.id, NEW.attempt, v_kind,
            pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                'message', v_message, 'event', v_event, 'status', NEW.status,
                'worker', coalesce(NEW.worker, OLD.worker), 'attempt', NEW.attempt)));
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_queued_notice(job_id bigint, waiting boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_queued_notice(job_id bigint, waiting boolean DEFAULT false)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_url text := pg_catalog.rtrim(pg_catalog.btrim(pg_catalog.current_setting('pgml.dashboard_url', true)), '/');
BEGIN
    RAISE NOTICE '%', pg_catalog.format('job %s queued: %s', job_id,
        CASE WHEN waiting THEN 'waiting for it (cancelling this statement cancels the job)'
             ELSE pg_catalog.format('follow it with CALL pgml.wait(%s)', job_id) END)
        || CASE WHEN v_url <> '' THEN pg_catalog.format(', or on the dashboard: %s/#job=%s', v_url, job_id) ELSE '' END;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._job_queued_notice(job_id bigint, waiting boolean) TO pgml_user;

-- FUNCTION pgml._job_resources(hyperparams jsonb, OUT gpus integer, OUT procs integer, OUT nodes integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_resources(hyperparams jsonb, OUT gpus integer, OUT procs integer, OUT nodes integer)
 RETURNS record
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    r jsonb := hyperparams -> 'resources';
BEGIN
    PERFORM pgml._check_resources(hyperparams);
    gpus := coalesce((r ->> 'gpus')::integer, 0);
    procs := coalesce((r ->> 'procs')::integer, 1);
    nodes := coalesce((r ->> 'nodes')::integer, 1);
END $function$;
GRANT EXECUTE ON FUNCTION pgml._job_resources(hyperparams jsonb, OUT gpus integer, OUT procs integer, OUT nodes integer) TO pgml_worker;

-- FUNCTION pgml._job_rows_put(job_id bigint, rows jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_rows_put(job_id bigint, rows jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._job_rows_put(job_id bigint, rows jsonb) TO pgml_loopback;

-- FUNCTION pgml._job_submit_ended(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_submit_ended()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = NEW.id AND j.status = 'submitting') THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = pg_catalog.format('job %s is still being submitted: a job is committed only once '
                                        'pgml._submitted has checked and queued it', NEW.id),
            HINT = 'submit jobs with pgml.tune(...) or INSERT INTO pgml.tune_requests';
    END IF;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_succeeded_deploy(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_succeeded_deploy()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF coalesce(NEW.automatic_deploy, true)
       AND NEW.task IN ('text-classification', 'text-pair-classification', 'conversation', 'text-embedding',
                        'text-ranking') THEN
        PERFORM pgml._auto_deploy(NEW.model_id);
    END IF;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_table(job_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_table(job_id bigint)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT 'job_' || job_id::text $function$;

-- FUNCTION pgml._job_table_begin(job_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_table_begin(job_id bigint)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._job_table_ended(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_table_ended()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._job_tables_drop(ARRAY[NEW.id]);
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_tables_deleted(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_tables_deleted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._job_tables_drop((SELECT pg_catalog.array_agg(g.id) FROM gone g));
    RETURN NULL;
END $function$;

-- FUNCTION pgml._job_tables_drop(job_ids bigint[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_tables_drop(job_ids bigint[])
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._job_tables_sweep(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._job_tables_sweep()
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._job_tables_sweep() TO pgml_worker;

-- FUNCTION pgml._jobs_resources_check(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._jobs_resources_check()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._key_fingerprint(n numeric), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._key_fingerprint(n numeric)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT left(encode(sha256(pgml._numeric_to_bytea(n)), 'hex'), 16)
$function$;

-- FUNCTION pgml._key_metric(metrics jsonb, task text, OUT value double precision, OUT higher boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._key_metric(metrics jsonb, task text, OUT value double precision, OUT higher boolean)
 RETURNS record
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE WHEN task IN ('conversation', 'text-generation') THEN (metrics ->> 'eval_loss')::double precision
                WHEN task IN ('text-embedding', 'text-ranking') THEN (metrics ->> 'eval_ndcg@10')::double precision
                ELSE coalesce((metrics ->> 'eval_accuracy')::double precision,
                              (metrics ->> 'eval_f1')::double precision) END,
           task NOT IN ('conversation', 'text-generation')
$function$;

-- FUNCTION pgml._log_line(logs jsonb, kind text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._log_line(logs jsonb, kind text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE
        WHEN kind IS DISTINCT FROM 'train' THEN
            CASE WHEN kind = 'info' THEN '' ELSE coalesce(kind, 'info') || ': ' END
            || coalesce(logs ->> 'message', logs::text)
        WHEN pg_catalog.jsonb_typeof(logs) <> 'object' THEN logs::text
        ELSE pg_catalog.concat_ws('  ',
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.jsonb_object_keys(logs) k WHERE k LIKE 'eval\_%') THEN 'eval'
                 WHEN logs ? 'train_runtime' OR logs ? 'train_loss' THEN 'train' END,
            CASE WHEN logs ? 'step' THEN 'step ' || pgml._log_value('step', logs -> 'step')
                                         || coalesce('/' || pgml._log_value('max_steps', logs -> 'max_steps'), '') END,
            pgml._log_pairs(logs, ARRAY['epoch', 'loss', 'grad_norm', 'learning_rate', 'eval_loss', 'train_loss'],
                            ARRAY['step', 'max_steps', 'timestamp', 'total_flos']
                            || CASE WHEN coalesce(logs ->> 'world_size', '1') = '1' THEN ARRAY['world_size']
                                    ELSE ARRAY[]::text[] END))
    END
$function$;
GRANT EXECUTE ON FUNCTION pgml._log_line(logs jsonb, kind text) TO pgml_user;

-- FUNCTION pgml._log_pairs(logs jsonb, first text[], skip text[], sep text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._log_pairs(logs jsonb, first text[], skip text[], sep text DEFAULT '  '::text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.string_agg(
               CASE e.key WHEN 'learning_rate' THEN 'lr' ELSE e.key END || ' ' || pgml._log_value(e.key, e.value),
               sep ORDER BY pg_catalog.array_position(first, e.key), e.key)
    FROM pg_catalog.jsonb_each(CASE WHEN pg_catalog.jsonb_typeof(logs) = 'object' THEN logs ELSE '{}' END) AS e
    WHERE e.key <> ALL (skip)
$function$;
GRANT EXECUTE ON FUNCTION pgml._log_pairs(logs jsonb, first text[], skip text[], sep text) TO pgml_user;

-- FUNCTION pgml._log_value(key text, value jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._log_value(key text, value jsonb)
 RETURNS text
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_text text := value #>> '{}';
    v numeric;
    v_abs numeric;
BEGIN
    IF value IS NULL OR pg_catalog.jsonb_typeof(value) <> 'number' THEN
        RETURN CASE WHEN pg_catalog.jsonb_typeof(value) = 'string' THEN v_text ELSE coalesce(value::text, 'null') END;
    END IF;
    v := v_text::numeric;
    v_abs := abs(v);
    IF v = 0 THEN
        RETURN '0';
    ELSIF v = trunc(v) AND v_text !~ '[.eE]' AND key <> 'learning_rate' THEN
        RETURN v_text;  -- a count: step 10000, train_runtime 2360
    ELSIF key = 'learning_rate' OR v_abs < 0.001 OR v_abs >= 1e9 THEN
        -- 4 significant digits in e-notation, trailing zeros of the mantissa dropped: 1.9e-05, 1.6e-05, 2e-05
        RETURN pg_catalog.regexp_replace(pg_catalog.btrim(pg_catalog.to_char(v, '9.999EEEE')), '\.?0+e', 'e');
    ELSIF pg_catalog.length(v_text) <= 6 THEN
        RETURN v_text;
    END IF;
    RETURN pg_catalog.trim_scale(round(v, greatest(0, 3 - floor(log(v_abs))::integer)))::text;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._log_value(key text, value jsonb) TO pgml_user;

-- FUNCTION pgml._logs_written(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._logs_written()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows n WHERE n.job_id IS NOT NULL) THEN
        PERFORM pg_catalog.pg_notify('pgml_logs', '{"type": "logs_written"}');
    END IF;
    RETURN NULL;
END $function$;

-- FUNCTION pgml._loopback(stmt text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback(stmt text)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_lb     pgml.loopback_login;
    v_pid    integer;
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
        v_pid := pgml._loopback_ready(v_schema, v_lb);
        BEGIN
            EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback',
                           pgml._loopback_statement(v_lb, v_pid, stmt))
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
        WHEN internal_error THEN
            -- dblink's "could not send query: another command is already in progress" (its words depend on
            -- lc_messages): the result of a pgml._loopback_send that pgml._loopback_ready did not know of (its mark
            -- went with a rolled-back transaction); read it, try once more (any other such error comes back then)
            IF v_try > 1 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.set_config('pgml.loopback_pending', 'on', false);
        END;
    END LOOP;
END $function$;

-- FUNCTION pgml._loopback_connect(v_schema name, v_lb pgml.loopback_login), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_connect(v_schema name, v_lb pgml.loopback_login)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_connstr text := format('%s dbname=%s user=%s password=%s application_name=pgml_loopback',
                             v_lb.conninfo, pgml._conn_quote(pg_catalog.current_database()),
                             pgml._conn_quote(v_lb.login), pgml._conn_quote(v_lb.password));
    v_pid    integer;
    v_detail text;
BEGIN
    IF pgml._dblink_connections(v_schema) @> ARRAY['pgml_loopback'] THEN
        EXECUTE format('SELECT %I.dblink_disconnect(%L)', v_schema, 'pgml_loopback');
    END IF;
    BEGIN
        IF pg_catalog.has_function_privilege(format('%I.dblink_connect_u(text, text)', v_schema), 'EXECUTE') THEN
            EXECUTE format('SELECT %I.dblink_connect_u(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
        ELSE
            EXECUTE format('SELECT %I.dblink_connect(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
        END IF;
    EXCEPTION
        WHEN prohibited_sql_statement_attempted THEN
            -- dblink's "password is required": the server let the login in without asking for its password (trust,
            -- peer), which dblink_connect refuses to a session that is not a superuser's
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_authorization_specification',
                MESSAGE = format('the loopback of database %s cannot log in: this server lets its login %s in '
                                 'without asking for a password (pg_hba.conf: trust or peer), and dblink refuses '
                                 'that to a session that is not a superuser''s',
                                 pg_catalog.current_database(), v_lb.login),
                DETAIL = format('dblink: %s (%s)', SQLERRM, v_detail),
                HINT = pgml._loopback_password_fix(v_lb);
        WHEN sqlclient_unable_to_establish_sqlconnection THEN
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'sqlclient_unable_to_establish_sqlconnection',
                MESSAGE = format('the loopback of database %s cannot connect to %s', pg_catalog.current_database(),
                                 v_lb.conninfo),
                DETAIL = format('dblink: %s (%s)', SQLERRM, pg_catalog.btrim(v_detail, E' \n')),
                HINT = 'an administrator says where this server reaches itself (a socket directory or an address '
                       'it listens on): SELECT pgml._setup_loopback(''host=... port=...'')';
    END;
    EXECUTE format('SELECT t.p FROM %I.dblink(%L, %L) AS t(p integer)', v_schema, 'pgml_loopback',
                   'SELECT pg_catalog.pg_backend_pid()') INTO v_pid;
    PERFORM pg_catalog.set_config('pgml.loopback_pid', v_pid::text, false);
    RETURN v_pid;
END $function$;

-- FUNCTION pgml._loopback_password_fix(v_lb pgml.loopback_login), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_password_fix(v_lb pgml.loopback_login)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.format(
        'an administrator adds this line to pg_hba.conf above the lines that let it in now (the first line that '
        'matches decides): %s — then runs SELECT pg_reload_conf(). Or, where connections over TCP ask for a '
        'password already: SELECT pgml._setup_loopback(''host=127.0.0.1 port=%s'')',
        pg_catalog.concat_ws(' ',
            CASE WHEN h.host IS NULL OR h.host LIKE '/%' OR h.host LIKE '@%' THEN 'local' ELSE 'host' END,
            CASE WHEN pg_catalog.current_database() ~ '^[a-z_][a-z0-9_]*$' THEN pg_catalog.current_database()::text
                 ELSE '"' || pg_catalog.current_database() || '"' END,
            v_lb.login,
            CASE WHEN h.host IS NULL OR h.host LIKE '/%' OR h.host LIKE '@%' THEN NULL ELSE 'samehost' END,
            'scram-sha-256'),
        pg_catalog.current_setting('port'))
    FROM (SELECT pg_catalog.substring(v_lb.conninfo, '(?:^|\s)host\s*=\s*''?([^''\s]+)') AS host) h
$function$;

-- FUNCTION pgml._loopback_proof(secret text, who text, pid integer, nonce text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_proof(secret text, who text, pid integer, nonce text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
        secret || ':' || who || ':' || pid::text || ':' || nonce, 'UTF8')), 'hex')
$function$;

-- FUNCTION pgml._loopback_ready(v_schema name, v_lb pgml.loopback_login), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_ready(v_schema name, v_lb pgml.loopback_login)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_pid integer := nullif(pg_catalog.current_setting('pgml.loopback_pid', true), '')::integer;
BEGIN
    IF v_pid IS NULL OR NOT EXISTS (
            SELECT 1 FROM pg_catalog.unnest(pgml._dblink_connections(v_schema)) c WHERE c = 'pgml_loopback') THEN
        PERFORM pg_catalog.set_config('pgml.loopback_pending', '', false);
        RETURN pgml._loopback_connect(v_schema, v_lb);
    END IF;
    IF pg_catalog.current_setting('pgml.loopback_pending', true) = 'on' THEN
        PERFORM pg_catalog.set_config('pgml.loopback_pending', '', false);
        BEGIN  -- its rows, or its error: not the caller's (what it did not do is done later)
            EXECUTE format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result(%L) AS t(v text)', v_schema,
                           'pgml_loopback');
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
        BEGIN  -- the end of its results
            EXECUTE format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result(%L) AS t(v text)', v_schema,
                           'pgml_loopback');
        EXCEPTION WHEN OTHERS THEN  -- a connection in a state of its own: a new one
            RETURN pgml._loopback_connect(v_schema, v_lb);
        END;
    END IF;
    RETURN v_pid;
END $function$;

-- FUNCTION pgml._loopback_send(stmt text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_send(stmt text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_lb     pgml.loopback_login;
    v_pid    integer;
BEGIN
    IF v_schema IS NULL THEN
        RETURN;  -- no loopback: nothing was submitted through one either
    END IF;
    SELECT * INTO v_lb FROM pgml.loopback_login;
    BEGIN
        v_pid := pgml._loopback_ready(v_schema, v_lb);
        EXECUTE format('SELECT %I.dblink_send_query(%L, %L)', v_schema, 'pgml_loopback',
                       pgml._loopback_statement(v_lb, v_pid, stmt));
        PERFORM pg_catalog.set_config('pgml.loopback_pending', 'on', false);
    EXCEPTION WHEN connection_exception OR sqlclient_unable_to_establish_sqlconnection OR admin_shutdown
                   OR crash_shutdown OR insufficient_privilege OR internal_error THEN
        NULL;  -- not sent: what it would have done is done later (see above); the next call connects again
    END;
END $function$;

-- FUNCTION pgml._loopback_statement(v_lb pgml.loopback_login, v_pid integer, stmt text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._loopback_statement(v_lb pgml.loopback_login, v_pid integer, stmt text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_nonce text := pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
BEGIN
    RETURN format('SELECT (%3$s)::text FROM (SELECT pg_catalog.set_config(''pgml.on_behalf_of'', %1$L, true), '
                  'pg_catalog.set_config(''pgml.loopback_proof'', %2$L, true) OFFSET 0) AS proof',
                  session_user, v_nonce || ':' || pgml._loopback_proof(v_lb.secret, session_user, v_pid, v_nonce),
                  stmt);
END $function$;

-- FUNCTION pgml._may_read_model(model_owner name, submitter name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._may_read_model(model_owner name, submitter name)
 RETURNS boolean
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT model_owner = submitter
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = submitter AND pg_catalog.pg_has_role(r.oid, 'pgml_admin', 'MEMBER'))
$function$;

-- FUNCTION pgml._may_use_credential(who text, credential text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._may_use_credential(who text, credential text)
 RETURNS boolean
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT EXISTS (SELECT 1 FROM pgml.credential_grants g
                   JOIN pg_catalog.pg_roles r ON r.rolname = g.role
                   JOIN pg_catalog.pg_roles u ON u.rolname = who
                   WHERE g.credential = _may_use_credential.credential
                     AND pg_catalog.pg_has_role(u.oid, r.oid, 'MEMBER'))
$function$;

-- FUNCTION pgml._mgf1_sha256(seed bytea, len integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._mgf1_sha256(seed bytea, len integer)
 RETURNS bytea
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    t       bytea := '';
    counter integer := 0;
BEGIN
    WHILE length(t) < len LOOP
        t := t || pg_catalog.sha256(seed || pg_catalog.int4send(counter));
        counter := counter + 1;
    END LOOP;
    RETURN substring(t FROM 1 FOR len);
END $function$;

-- FUNCTION pgml._model_ref(model_id bigint, project text, owner name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._model_ref(model_id bigint, project text, owner name)
 RETURNS TABLE(id bigint, status text, base_model text, task text, project_name text)
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_model_ref.model_id IS NOT NULL AND m.id = _model_ref.model_id)
           OR (_model_ref.model_id IS NULL AND p.name = _model_ref.project AND m.status = 'successful'))
      AND (m.owner = _model_ref.owner
           OR EXISTS (SELECT 1 FROM pg_roles r
                      WHERE r.rolname = _model_ref.owner AND pg_has_role(r.oid, 'pgml_admin', 'MEMBER')))
    ORDER BY (p.owner = _model_ref.owner) DESC, m.id DESC
    LIMIT 1
$function$;
GRANT EXECUTE ON FUNCTION pgml._model_ref(model_id bigint, project text, owner name) TO pgml_worker;

-- FUNCTION pgml._modpow(base numeric, exponent numeric, modulus numeric), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._modpow(base numeric, exponent numeric, modulus numeric)
 RETURNS numeric
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    result numeric := 1;
    b      numeric;
    x      numeric := exponent;
BEGIN
    IF modulus < 1 OR exponent < 0 THEN
        RAISE EXCEPTION 'pgml._modpow: needs modulus >= 1 and exponent >= 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF modulus = 1 THEN
        RETURN 0;
    END IF;
    b := mod(base, modulus);
    IF b < 0 THEN
        b := b + modulus;
    END IF;
    WHILE x > 0 LOOP
        IF mod(x, 2) = 1 THEN
            result := mod(result * b, modulus);
        END IF;
        x := div(x, 2);
        IF x > 0 THEN
            b := mod(b * b, modulus);
        END IF;
    END LOOP;
    RETURN result;
END $function$;

-- FUNCTION pgml._numeric_to_bytea(v numeric, len integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._numeric_to_bytea(v numeric, len integer DEFAULT NULL::integer)
 RETURNS bytea
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    x   numeric := v;
    h   text := '';
    two56 CONSTANT numeric := 72057594037927936;  -- 2^56
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    END IF;
    IF v < 0 OR v <> trunc(v) THEN
        RAISE EXCEPTION 'pgml._numeric_to_bytea: needs a non-negative integer'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    x := trunc(x);
    WHILE x > 0 LOOP
        h := lpad(to_hex(mod(x, two56)::bigint), 14, '0') || h;
        x := div(x, two56);
    END LOOP;
    h := ltrim(h, '0');
    IF length(h) % 2 = 1 THEN
        h := '0' || h;
    END IF;
    IF len IS NULL THEN
        IF h = '' THEN
            h := '00';
        END IF;
    ELSIF length(h) > 2 * len THEN
        RAISE EXCEPTION 'pgml._numeric_to_bytea: the integer does not fit in % bytes', len
            USING ERRCODE = 'numeric_value_out_of_range';
    ELSE
        h := lpad(h, 2 * len, '0');
    END IF;
    RETURN decode(h, 'hex');
END $function$;

-- FUNCTION pgml._oaep_encrypt(n numeric, e numeric, message bytea, label bytea), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._oaep_encrypt(n numeric, e numeric, message bytea, label bytea)
 RETURNS bytea
 LANGUAGE plpgsql
 STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    k      integer := length(pgml._numeric_to_bytea(n));
    h_len  CONSTANT integer := 32;
    db     bytea;
    seed   bytea := pgml._random_bytes(32);
    masked bytea;
BEGIN
    IF length(message) > k - 2 * h_len - 2 THEN
        RAISE EXCEPTION 'pgml._oaep_encrypt: message too long for the key'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    db := pg_catalog.sha256(label) || pg_catalog.decode(pg_catalog.repeat('00', k - length(message) - 2 * h_len - 2), 'hex')
          || '\x01'::bytea || message;
    masked := pgml._xor(db, pgml._mgf1_sha256(seed, k - h_len - 1));
    RETURN pgml._numeric_to_bytea(
        pgml._modpow(pgml._bytea_to_numeric('\x00'::bytea || pgml._xor(seed, pgml._mgf1_sha256(masked, h_len))
                                            || masked), e, n),
        k);
END $function$;

-- FUNCTION pgml._output_insert_check(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._output_insert_check()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._own_everything(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._own_everything()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._own_project(p_name text, who name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._own_project(p_name text, who name)
 RETURNS pgml.projects
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._own_project_ref(model text, who name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._own_project_ref(model text, who name)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE WHEN model !~ '[/~:]' AND model NOT LIKE '.%'
                     AND EXISTS (SELECT 1 FROM pgml.projects p WHERE p.name = model AND p.owner = who)
                THEN 'pgml:' || model ELSE model END
$function$;
GRANT EXECUTE ON FUNCTION pgml._own_project_ref(model text, who name) TO pgml_user;

-- FUNCTION pgml._quick(stmt text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._quick(stmt text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pg_catalog.format('(SELECT %s FROM (SELECT pg_catalog.set_config(''synchronous_commit'', ''off'', true) '
                             'OFFSET 0) AS quick)', stmt)
$function$;

-- FUNCTION pgml._random_bytes(count integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._random_bytes(count integer)
 RETURNS bytea
 LANGUAGE plpgsql
 PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    out bytea := '';
    u   bytea;
BEGIN
    WHILE length(out) < count LOOP
        u := pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
        out := out || substring(u FROM 1 FOR 6) || substring(u FROM 8 FOR 1) || substring(u FROM 10 FOR 7);
    END LOOP;
    RETURN substring(out FROM 1 FOR count);
END $function$;

-- FUNCTION pgml._refuse_hub_model(model_name text, owner name, task text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._refuse_hub_model(model_name text, owner name, task text DEFAULT NULL::text)
 RETURNS void
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM pgml._hub_refusal(_refuse_hub_model.model_name, _refuse_hub_model.owner,
                                           _refuse_hub_model.task) h;
    IF r.message IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = r.message,
            HINT = r.hint,
            ERRCODE = 'insufficient_privilege';
    END IF;
END $function$;

-- FUNCTION pgml._request_abandon(id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_abandon(id bigint)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    WITH gone AS (
        DELETE FROM pgml.requests r WHERE r.id OPERATOR(pg_catalog.=) _request_abandon.id
          AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
               OR pg_catalog.has_function_privilege(pgml._submitter(), 'pgml._request_submit(name, text, text, jsonb, jsonb)',
                                                    'EXECUTE'))
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$function$;
GRANT EXECUTE ON FUNCTION pgml._request_abandon(id bigint) TO pgml_admin;
GRANT EXECUTE ON FUNCTION pgml._request_abandon(id bigint) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml._request_abandon(id bigint) TO pgml_user;

-- FUNCTION pgml._request_answer(id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_answer(id bigint)
 RETURNS TABLE(status text, result jsonb, error text, usage jsonb)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_trusted boolean := pg_catalog.has_function_privilege(pgml._submitter(),
                             'pgml._request_submit(name, text, text, jsonb, jsonb)', 'EXECUTE');
    v_status  text;
BEGIN
    LOOP
        RETURN QUERY
        DELETE FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id AND r.status IN ('done', 'failed')
          AND (v_trusted OR r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter())
        RETURNING r.status, coalesce(r.result, pgml._vector_literals(r.vectors, r.n_inputs)), r.error, r.usage;
        IF FOUND THEN
            RETURN;
        END IF;
        SELECT r.status INTO v_status FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_answer.id
          AND (v_trusted OR r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter());
        IF NOT FOUND THEN
            RETURN;  -- consumed, expired, or never the caller's
        END IF;
        -- answered between the DELETE's snapshot and now: consume it (the loop's next DELETE sees it)
        EXIT WHEN v_status NOT IN ('done', 'failed');
    END LOOP;
    status := v_status;
    RETURN NEXT;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._request_answer(id bigint) TO pgml_admin;
GRANT EXECUTE ON FUNCTION pgml._request_answer(id bigint) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml._request_answer(id bigint) TO pgml_user;

-- FUNCTION pgml._request_args(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_args()
 RETURNS TABLE(kind text, key text, type text, min numeric, max numeric, choices text[], use text)
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT k.kind, a.key, a.type, a.min, a.max, a.choices, a.use
    FROM (VALUES ('classify'), ('generate'), ('chat'), ('embed'), ('rank')) AS k (kind)
    JOIN (VALUES
        ('*',        'timeout',              'number',  0.1,  3600, NULL::text[], 'lane'),
        ('*',        'load_in_8bit',         'flag',    NULL, NULL, NULL, 'ignored'),
        ('*',        'load_in_4bit',         'flag',    NULL, NULL, NULL, 'ignored'),
        ('*',        'cache_model',          'flag',    NULL, NULL, NULL, 'ignored'),
        ('classify', 'top_k',                'integer', 1,    1000, NULL, 'pipeline'),
        ('classify', 'function_to_apply',    'string',  NULL, NULL, ARRAY['sigmoid', 'softmax', 'none'], 'pipeline'),
        ('classify', 'truncation',           'boolean', NULL, NULL, NULL, 'pipeline'),
        ('classify', 'max_length',           'integer', 1,    8192, NULL, 'pipeline'),
        ('classify', 'batch_size',           'integer', 1,    64,   NULL, 'pipeline'),
        ('gen',      'stream',               'boolean', NULL, NULL, NULL, 'lane'),
        ('gen',      'max_new_tokens',       'integer', 1,    4096, NULL, 'generate'),
        ('gen',      'max_tokens',           'integer', 1,    4096, NULL, 'generate'),
        ('gen',      'min_new_tokens',       'integer', 0,    4096, NULL, 'generate'),
        ('gen',      'temperature',          'number',  0,    100,  NULL, 'generate'),
        ('gen',      'top_p',                'number',  0,    1,    NULL, 'generate'),
        ('gen',      'top_k',                'integer', 0,    1000, NULL, 'generate'),
        ('gen',      'typical_p',            'number',  0,    1,    NULL, 'generate'),
        ('gen',      'repetition_penalty',   'number',  0.01, 100,  NULL, 'generate'),
        ('gen',      'length_penalty',       'number',  -100, 100,  NULL, 'generate'),
        ('gen',      'no_repeat_ngram_size', 'integer', 0,    64,   NULL, 'generate'),
        ('gen',      'num_beams',            'integer', 1,    8,    NULL, 'generate'),
        ('gen',      'do_sample',            'boolean', NULL, NULL, NULL, 'generate'),
        -- (since 0041) SentenceTransformer.encode's; a CrossEncoder's ranking, cut by pgml.rank itself ('call')
        ('embed',    'normalize',            'boolean', NULL, NULL, NULL, 'encode'),
        ('embed',    'prompt',               'string',  NULL, NULL, NULL, 'encode'),
        ('embed',    'prompt_name',          'string',  NULL, NULL, NULL, 'encode'),
        ('embed',    'truncate_dim',         'integer', 1,    65536, NULL, 'encode'),
        ('rank',     'top_k',                'integer', 1,    1000, NULL, 'call'),
        ('rank',     'return_documents',     'boolean', NULL, NULL, NULL, 'call')
    ) AS a (kinds, key, type, min, max, choices, use)
      ON a.kinds = '*' OR a.kinds = k.kind OR (a.kinds = 'gen' AND k.kind IN ('generate', 'chat'))
$function$;

-- FUNCTION pgml._request_args_check(kind text, args jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_args_check(kind text, args jsonb)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_bad     text;
    v_allowed text;
    r         record;
    v_num     numeric;
    v_ok      boolean;
    v_a       text := CASE kind WHEN 'embed' THEN 'an embed' ELSE 'a ' OPERATOR(pg_catalog.||) kind END;
BEGIN
    SELECT pg_catalog.string_agg(e.key, ', ' ORDER BY e.key), pg_catalog.count(*) INTO r
    FROM pg_catalog.jsonb_object_keys(args) AS e (key)
    WHERE NOT EXISTS (SELECT 1 FROM pgml._request_args() a
                      WHERE a.kind OPERATOR(pg_catalog.=) _request_args_check.kind
                        AND a.key OPERATOR(pg_catalog.=) e.key);
    v_bad := r.string_agg;
    IF v_bad IS NOT NULL THEN
        SELECT pg_catalog.string_agg(pg_catalog.format('%s (%s)', a.key,
                   CASE WHEN a.choices IS NOT NULL THEN 'one of ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(a.choices, ', ')
                        WHEN a.min IS NOT NULL THEN pg_catalog.format('%s %s..%s', a.type, a.min, a.max)
                        ELSE a.type END), ', ' ORDER BY a.key)
        INTO v_allowed
        FROM pgml._request_args() a
        WHERE a.kind OPERATOR(pg_catalog.=) _request_args_check.kind AND a.use OPERATOR(pg_catalog.<>) 'ignored';
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('args %s %s not allowed in %s request', v_bad,
                                        CASE WHEN r.count OPERATOR(pg_catalog.=) 1 THEN 'is' ELSE 'are' END, v_a),
            HINT = pg_catalog.format('%s request takes: %s (load_in_8bit, load_in_4bit and cache_model are accepted '
                                     'and ignored: the worker decides how it loads a model)', v_a, v_allowed);
    END IF;
    FOR r IN SELECT e.key, e.value, a.type, a.min, a.max, a.choices
             FROM pg_catalog.jsonb_each(args) AS e JOIN pgml._request_args() a
               ON a.kind OPERATOR(pg_catalog.=) _request_args_check.kind AND a.key OPERATOR(pg_catalog.=) e.key
    LOOP
        v_num := CASE WHEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'number' THEN (r.value #>> '{}')::numeric END;
        v_ok := CASE r.type
                WHEN 'integer' THEN v_num IS NOT NULL AND v_num OPERATOR(pg_catalog.=) pg_catalog.trunc(v_num)
                WHEN 'number' THEN v_num IS NOT NULL
                WHEN 'boolean' THEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'boolean'
                WHEN 'string' THEN pg_catalog.jsonb_typeof(r.value) OPERATOR(pg_catalog.=) 'string'
                    AND (r.choices IS NULL OR (r.value #>> '{}') OPERATOR(pg_catalog.=) ANY (r.choices))
                ELSE pg_catalog.jsonb_typeof(r.value) IN ('boolean', 'string', 'null') END;
        IF NOT v_ok OR v_num OPERATOR(pg_catalog.<) r.min OR v_num OPERATOR(pg_catalog.>) r.max THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = pg_catalog.format('args.%s = %s: %s request takes %s', r.key, pg_catalog.left(r.value::text, 100), v_a,
                    CASE WHEN r.choices IS NOT NULL THEN 'one of ' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(r.choices, ', ')
                         WHEN r.min IS NOT NULL THEN pg_catalog.format('%s %s from %s to %s',
                                  CASE r.type WHEN 'integer' THEN 'a whole number' ELSE 'a number' END, r.key, r.min, r.max)
                         WHEN r.type OPERATOR(pg_catalog.=) 'flag' THEN 'true or false'
                         ELSE pg_catalog.format('a JSON %s', r.type) END),
                HINT = CASE WHEN r.max IS NOT NULL THEN pg_catalog.format('e.g. "%s": %s', r.key, r.max)
                            WHEN r.type OPERATOR(pg_catalog.=) 'boolean' THEN pg_catalog.format('e.g. "%s": true', r.key)
                            ELSE 'see the inference docs' END;
        END IF;
    END LOOP;
END $function$;

-- FUNCTION pgml._request_chunk(id bigint, serving_id text, first_seq integer, texts text[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_chunk(id bigint, serving_id text, first_seq integer, texts text[])
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    WITH owned AS (
        SELECT r.id FROM pgml.requests r
        WHERE r.id OPERATOR(pg_catalog.=) _request_chunk.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
          AND r.status OPERATOR(pg_catalog.=) 'running'
    ), ins AS (
        INSERT INTO pgml.request_chunks (request_id, seq, text)
        SELECT o.id, first_seq OPERATOR(pg_catalog.+) (t.n OPERATOR(pg_catalog.-) 1)::integer, t.text
        FROM owned o, unnest(texts) WITH ORDINALITY AS t (text, n)
        ON CONFLICT DO NOTHING
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM owned)
$function$;
GRANT EXECUTE ON FUNCTION pgml._request_chunk(id bigint, serving_id text, first_seq integer, texts text[]) TO pgml_serving;

-- FUNCTION pgml._request_chunks(id bigint, after_seq integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_chunks(id bigint, after_seq integer DEFAULT '-1'::integer)
 RETURNS TABLE(seq integer, text text)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT c.seq, c.text FROM pgml.request_chunks c JOIN pgml.requests r ON r.id OPERATOR(pg_catalog.=) c.request_id
    WHERE c.request_id OPERATOR(pg_catalog.=) _request_chunks.id AND c.seq OPERATOR(pg_catalog.>) after_seq
      AND (r.submitted_by OPERATOR(pg_catalog.=) pgml._submitter()
           OR pg_catalog.has_function_privilege(pgml._submitter(), 'pgml._request_submit(name, text, text, jsonb, jsonb)',
                                                'EXECUTE'))
    ORDER BY c.seq
$function$;
GRANT EXECUTE ON FUNCTION pgml._request_chunks(id bigint, after_seq integer) TO pgml_admin;
GRANT EXECUTE ON FUNCTION pgml._request_chunks(id bigint, after_seq integer) TO pgml_user;

-- FUNCTION pgml._request_finish(id bigint, serving_id text, result jsonb, usage jsonb, error text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_finish(id bigint, serving_id text, result jsonb, usage jsonb, error text)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._async_commit();  -- (since 0044) see pgml._requests_claim
    UPDATE pgml.requests r
    SET status = CASE WHEN _request_finish.error IS NULL THEN 'done' ELSE 'failed' END,
        result = _request_finish.result, usage = _request_finish.usage,
        error = pg_catalog.left(_request_finish.error, 8000),
        answered_at = pg_catalog.clock_timestamp(), lease_expires_at = NULL
    WHERE r.id OPERATOR(pg_catalog.=) _request_finish.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
      AND r.status OPERATOR(pg_catalog.=) 'running';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.pg_notify('pgml_answers', '{"type": "request_answered"}');
    RETURN true;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._request_finish(id bigint, serving_id text, result jsonb, usage jsonb, error text) TO pgml_serving;

-- FUNCTION pgml._request_lock_key(id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_lock_key(id bigint)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT (id OPERATOR(pg_catalog.%) 2147483647)::integer $function$;
GRANT EXECUTE ON FUNCTION pgml._request_lock_key(id bigint) TO pgml_serving;

-- FUNCTION pgml._request_lock_space(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_lock_space()
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT 1885826412 $function$;
GRANT EXECUTE ON FUNCTION pgml._request_lock_space() TO pgml_serving;

-- FUNCTION pgml._request_submit(submitter name, kind text, model text, args jsonb, inputs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_submit(submitter name, kind text, model text, args jsonb, inputs jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_args    jsonb := coalesce(_request_submit.args, '{}');  -- secrets ("token": ...) are dropped below
    v_model   text := pg_catalog.btrim(coalesce(_request_submit.model, ''));
    v_ref     text;
    v_row     record;
    v_msg     jsonb;
    v_i       integer := 0;
    v_timeout double precision;
    v_id      bigint;
    v_stream  boolean;
    v_n       integer;
    v_lim     pgml.role_limits;
    v_pending record;
BEGIN
    IF submitter IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = submitter) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('unknown submitter %L', submitter),
            HINT = 'pass the login that asks',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind IS NULL OR kind OPERATOR(pg_catalog.<>) ALL (ARRAY['classify', 'generate', 'chat', 'embed', 'rank']) THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('unknown request kind %L', kind),
            HINT = 'kinds are: ''classify'', ''generate'', ''chat'', ''embed'', ''rank''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_model OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION USING MESSAGE = 'a model is required',
            HINT = 'name a Hugging Face model id, pgml:<project> (its deployed model) or pgml:model:<id>',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.jsonb_typeof(v_args) OPERATOR(pg_catalog.<>) 'object' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('args must be a JSON object, got a JSON %s', pg_catalog.jsonb_typeof(v_args)),
            HINT = 'e.g. ''{"max_new_tokens": 32}''',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.octet_length(v_args::text) OPERATOR(pg_catalog.>) 65536 THEN
        RAISE EXCEPTION USING MESSAGE = 'args are over 64 KiB',
            HINT = 'pass only the settings the pipeline needs',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a hub token is never stored: gated models are served with the workers' own hub access
    v_args := v_args OPERATOR(pg_catalog.-) pgml._secret_keys();
    v_stream := coalesce(pg_catalog.jsonb_typeof(v_args -> 'stream') OPERATOR(pg_catalog.=) 'boolean'
                         AND (v_args ->> 'stream')::boolean, false);
    IF v_stream AND kind OPERATOR(pg_catalog.=) 'classify' THEN
        RAISE EXCEPTION USING MESSAGE = 'stream is for generation',
            HINT = 'leave "stream" out of a classification''s args',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_args ? 'timeout' THEN
        IF pg_catalog.jsonb_typeof(v_args -> 'timeout') OPERATOR(pg_catalog.<>) 'number'
           OR (v_args ->> 'timeout')::double precision NOT BETWEEN 0.1 AND 3600 THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('args.timeout %s is not a number of seconds from 0.1 to 3600',
                                                 v_args -> 'timeout'),
                HINT = 'e.g. "timeout": 30',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    v_timeout := coalesce((v_args ->> 'timeout')::double precision, 60);

    -- inputs
    IF inputs IS NULL OR pg_catalog.jsonb_typeof(inputs) OPERATOR(pg_catalog.<>) 'array'
       OR pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION USING MESSAGE = 'inputs are empty or NULL',
            HINT = CASE WHEN kind OPERATOR(pg_catalog.=) 'chat' THEN
                'pass the conversation: [{"role": "user", "content": "..."}]'
            ELSE 'pass at least one text, e.g. ARRAY[''I love this movie'']' END,
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.octet_length(inputs::text) OPERATOR(pg_catalog.>) 1048576 THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('inputs are %s bytes, over the limit of 1 MiB',
                                             pg_catalog.octet_length(inputs::text)),
            HINT = 'split them into several calls (or a batch job over a table)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.jsonb_array_length(inputs) OPERATOR(pg_catalog.>) 1000 THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('%s inputs, over the limit of 1000 per call',
                                             pg_catalog.jsonb_array_length(inputs)),
            HINT = 'split them into several calls (or a batch job over a table)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind OPERATOR(pg_catalog.=) 'chat' THEN
        FOR v_msg IN SELECT e FROM pg_catalog.jsonb_array_elements(inputs) e LOOP
            v_i := v_i OPERATOR(pg_catalog.+) 1;
            IF pg_catalog.jsonb_typeof(v_msg) OPERATOR(pg_catalog.<>) 'object'
               OR pg_catalog.jsonb_typeof(v_msg -> 'role') IS DISTINCT FROM 'string'
               OR pg_catalog.jsonb_typeof(v_msg -> 'content') IS DISTINCT FROM 'string' THEN
                RAISE EXCEPTION USING MESSAGE = pg_catalog.format('message %s is malformed: %s', v_i, pg_catalog.left(v_msg::text, 200)),
                    HINT = 'each message is {"role": "system"|"user"|"assistant", "content": "text"}',
                    ERRCODE = 'invalid_parameter_value';
            END IF;
            IF (v_msg ->> 'role') OPERATOR(pg_catalog.<>) ALL (ARRAY['system', 'user', 'assistant', 'tool']) THEN
                RAISE EXCEPTION USING MESSAGE = pg_catalog.format('message %s has an unknown role %L', v_i, v_msg ->> 'role'),
                    HINT = 'roles are system, user, assistant (and tool)',
                    ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(inputs) e
                  WHERE pg_catalog.jsonb_typeof(e) OPERATOR(pg_catalog.<>) 'string') THEN
        RAISE EXCEPTION USING MESSAGE = 'inputs must be texts (a JSON array of strings), with no NULL among them',
            HINT = 'e.g. ARRAY[''I love this movie'', ''I hated it'']',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- the model: a stored one only if the submitter may read it, and only for a kind its task serves
    v_model := pgml._own_project_ref(v_model, submitter);  -- a bare project name of the submitter's: that project
    IF v_model LIKE 'pgml:%' THEN
        v_ref := pg_catalog.substr(v_model, 6);
        IF v_ref LIKE 'model:%' AND v_ref OPERATOR(pg_catalog.!~) '^model:[0-9]+$' THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: write pgml:model:<id> with a numeric id', v_model),
                HINT = 'e.g. pgml:model:42',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF v_ref IS NOT NULL THEN
        SELECT * INTO v_row FROM pgml._serving_model(submitter, v_ref) LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: there is no %s that %s may use', v_model,
                                   CASE WHEN v_ref LIKE 'model:%' THEN 'such model' ELSE 'successful model in such a project' END,
                                   submitter),
                HINT = 'SELECT id, project_id, status FROM pgml.models lists the models you may use',
                ERRCODE = 'undefined_object';
        END IF;
        IF v_row.status OPERATOR(pg_catalog.<>) 'successful' THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L: model %s is %s, not successful', v_model, v_row.id, v_row.status),
                HINT = 'serve a model whose training succeeded',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT (kind OPERATOR(pg_catalog.=) ANY (pgml._serving_kinds(v_row.task))) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('model %L is a %s model: it cannot answer %s request', v_model,
                                                 v_row.task,
                                                 CASE kind WHEN 'embed' THEN 'an embed' ELSE 'a ' OPERATOR(pg_catalog.||) kind END),
                HINT = CASE WHEN v_row.task LIKE '%classification' THEN 'use it for text-classification'
                     WHEN v_row.task OPERATOR(pg_catalog.=) 'text-embedding' THEN 'use it with pgml.embed'
                     WHEN v_row.task OPERATOR(pg_catalog.=) 'text-ranking' THEN 'use it with pgml.rank'
                     ELSE 'use it for text-generation or chat' END,
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    -- (since 0033) only the args of the allow-list, within their bounds
    PERFORM pgml._request_args_check(kind, v_args);

    -- (since 0033) what one login may have pending in the lane: requests, and their texts all together. Counted
    -- without a lock (a lock by login name is one anybody could hold): concurrent submits of one login may pass a
    -- cap by as many as it has sessions submitting at once
    v_n := CASE WHEN kind OPERATOR(pg_catalog.=) 'chat' THEN 1 ELSE pg_catalog.jsonb_array_length(inputs) END;
    v_lim := pgml._role_limits(submitter);
    IF v_lim.max_pending_requests IS NOT NULL OR v_lim.max_pending_inputs IS NOT NULL THEN
        SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(r.n_inputs), 0) AS texts INTO v_pending
        FROM pgml.requests r
        WHERE r.submitted_by OPERATOR(pg_catalog.=) submitter AND r.status IN ('queued', 'running');
        IF v_pending.n OPERATOR(pg_catalog.>=) v_lim.max_pending_requests THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = pg_catalog.format('%s has %s requests pending in the inference lane; the limit for %s is %s '
                                            '(pgml.role_limits.max_pending_requests)', submitter, v_pending.n,
                                            v_lim.role, v_lim.max_pending_requests),
                HINT = 'wait for their answers before sending more (or send more texts per request), or ask an '
                       'administrator to raise pgml.role_limits.max_pending_requests';
        END IF;
        IF v_pending.texts OPERATOR(pg_catalog.+) v_n OPERATOR(pg_catalog.>) v_lim.max_pending_inputs THEN
            RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
                MESSAGE = pg_catalog.format('%s has %s texts pending in the inference lane and this request adds %s; the '
                                            'limit for %s is %s (pgml.role_limits.max_pending_inputs)', submitter,
                                            v_pending.texts, v_n, v_lim.role, v_lim.max_pending_inputs),
                HINT = 'wait for their answers before sending more, use pgml.predict_batch for a whole table, or ask '
                       'an administrator to raise pgml.role_limits.max_pending_inputs';
        END IF;
    END IF;

    -- now and then, what nobody will read again goes (a lane with no serving process never grows either)
    IF pg_catalog.random() OPERATOR(pg_catalog.<) 0.01 THEN
        PERFORM pgml._requests_expire();
    END IF;

    INSERT INTO pgml.requests (submitted_by, kind, model, args, inputs, stream, deadline, n_inputs)
    VALUES (submitter, kind, v_model, v_args, inputs, v_stream,
            pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => v_timeout), v_n)
    RETURNING id INTO v_id;
    PERFORM pg_catalog.pg_notify('pgml_requests', '{"type": "request_queued"}');
    RETURN v_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._request_submit(submitter name, kind text, model text, args jsonb, inputs jsonb) TO pgml_admin;

-- FUNCTION pgml._request_timeout(args jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._request_timeout(args jsonb)
 RETURNS double precision
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE WHEN pg_catalog.jsonb_typeof(args -> 'timeout') OPERATOR(pg_catalog.=) 'number'
                THEN (args ->> 'timeout')::double precision ELSE 30 END
$function$;

-- FUNCTION pgml._requests_answer(serving_id text, ids bigint[], results jsonb[], counts integer[], dim integer, flat real[]), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._requests_answer(serving_id text, ids bigint[], results jsonb[], counts integer[] DEFAULT NULL::integer[], dim integer DEFAULT NULL::integer, flat real[] DEFAULT NULL::real[])
 RETURNS SETOF bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_id bigint;
BEGIN
    IF flat IS NOT NULL AND (pg_catalog.cardinality(ids) OPERATOR(pg_catalog.<>) pg_catalog.cardinality(counts)
       OR dim IS NULL OR dim OPERATOR(pg_catalog.<) 1 OR pg_catalog.cardinality(flat) OPERATOR(pg_catalog.<>)
          (dim OPERATOR(pg_catalog.*) (SELECT pg_catalog.sum(c) FROM pg_catalog.unnest(counts) AS c))) THEN
        RAISE EXCEPTION 'pgml._requests_answer: % values are not % requests'' vectors of % values each',
            pg_catalog.cardinality(flat), pg_catalog.cardinality(ids), dim USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgml._async_commit();  -- (since 0044) see pgml._requests_claim
    FOR v_id IN
        UPDATE pgml.requests r
        SET status = 'done', result = a.result,
            vectors = flat[a.first OPERATOR(pg_catalog.*) dim OPERATOR(pg_catalog.+) 1
                           : (a.first OPERATOR(pg_catalog.+) a.n) OPERATOR(pg_catalog.*) dim],
            answered_at = pg_catalog.clock_timestamp(), lease_expires_at = NULL
        FROM (SELECT u.id, u.result, u.n,
                     (pg_catalog.sum(u.n) OVER (ORDER BY u.i) OPERATOR(pg_catalog.-) u.n)::integer AS first
              FROM unnest(ids, results, counts) WITH ORDINALITY AS u (id, result, n, i)) AS a
        WHERE r.id OPERATOR(pg_catalog.=) a.id AND r.claimed_by OPERATOR(pg_catalog.=) serving_id
          AND r.status OPERATOR(pg_catalog.=) 'running'
          AND (flat IS NULL OR (r.kind OPERATOR(pg_catalog.=) 'embed' AND r.n_inputs OPERATOR(pg_catalog.=) a.n))
        RETURNING r.id
    LOOP
        RETURN NEXT v_id;
    END LOOP;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('pgml_answers', '{"type": "request_answered"}');
    END IF;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._requests_answer(serving_id text, ids bigint[], results jsonb[], counts integer[], dim integer, flat real[]) TO pgml_serving;

-- FUNCTION pgml._requests_claim(serving_id text, max_n integer, lease_seconds double precision, max_inputs integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._requests_claim(serving_id text, max_n integer, lease_seconds double precision, max_inputs integer DEFAULT 512)
 RETURNS TABLE(id bigint, submitted_by name, kind text, model text, args jsonb, inputs jsonb, stream boolean, attempts integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
BEGIN
    -- PL/pgSQL, not SQL: its plan is kept for the session (before PostgreSQL 18 a SQL function's statement is planned
    -- at every call, 0.4 ms of every claim on PostgreSQL 15)
    RETURN QUERY
    WITH RECURSIVE submitters AS (
        (SELECT q.submitted_by FROM pgml.requests q
         WHERE q.status IN ('queued', 'running')
         ORDER BY q.submitted_by LIMIT 1)
        UNION ALL
        SELECT (SELECT q.submitted_by FROM pgml.requests q
                WHERE q.status IN ('queued', 'running') AND q.submitted_by OPERATOR(pg_catalog.>) s.submitted_by
                ORDER BY q.submitted_by LIMIT 1)
        FROM submitters s WHERE s.submitted_by IS NOT NULL
    ), placed AS (
        SELECT c.id, c.n_inputs, c.place
        FROM submitters s, LATERAL (
            SELECT q.id, q.n_inputs, pg_catalog.sum(q.n_inputs) OVER (ORDER BY q.id) AS place
            FROM pgml.requests q
            WHERE q.submitted_by OPERATOR(pg_catalog.=) s.submitted_by AND q.status IN ('queued', 'running')
              AND q.status OPERATOR(pg_catalog.=) 'queued'
              AND q.deadline OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()
            ORDER BY q.id
            LIMIT max_n
        ) c
        WHERE s.submitted_by IS NOT NULL
    ), chosen AS (
        SELECT x.id, x.rank FROM (
            SELECT p.id, pg_catalog.row_number() OVER w AS rank,
                   pg_catalog.sum(p.n_inputs) OVER w OPERATOR(pg_catalog.-) p.n_inputs AS before
            FROM placed p
            WINDOW w AS (ORDER BY p.place, p.id)
        ) x
        WHERE x.rank OPERATOR(pg_catalog.<=) max_n
          AND (x.rank OPERATOR(pg_catalog.=) 1 OR x.before OPERATOR(pg_catalog.<) max_inputs)
    ), picked AS (
        SELECT q.id, ch.rank FROM pgml.requests q JOIN chosen ch ON ch.id OPERATOR(pg_catalog.=) q.id
        WHERE q.status OPERATOR(pg_catalog.=) 'queued'
        FOR UPDATE OF q SKIP LOCKED
    ), claimed AS (
        UPDATE pgml.requests r
        SET status = 'running', claimed_by = serving_id, attempts = r.attempts OPERATOR(pg_catalog.+) 1,
            lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
        FROM picked
        WHERE r.id OPERATOR(pg_catalog.=) picked.id
        RETURNING r.id, r.submitted_by, r.kind, r.model, r.args, r.inputs, r.stream, r.attempts, picked.rank
    )
    -- held by this session (the serving process's lane connection) until its answer is committed
    SELECT c.id, c.submitted_by, c.kind, c.model, c.args, c.inputs, c.stream, c.attempts
    FROM claimed c, LATERAL pg_catalog.pg_try_advisory_lock(pgml._request_lock_space(), pgml._request_lock_key(c.id)) l,
         -- (since 0044) the serving process's writes here (its claims and answers, each a transaction of its own)
         -- commit without waiting for their WAL flush (pgml._async_commit): a lost claim is claimed again, a lost
         -- answer's request is released when its lease runs out and answered again; a flush is a millisecond or more
         -- of every one-text call
         pgml._async_commit() AS quick
    ORDER BY c.rank;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._requests_claim(serving_id text, max_n integer, lease_seconds double precision, max_inputs integer) TO pgml_serving;

-- FUNCTION pgml._requests_expire(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._requests_expire()
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    WITH gone AS (
        DELETE FROM pgml.requests r
        WHERE (r.status OPERATOR(pg_catalog.=) 'queued' AND r.deadline OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp())
           OR (r.status IN ('done', 'failed')
               AND r.answered_at OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) interval '60 seconds'))
        RETURNING 1)
    SELECT pg_catalog.count(*) FROM gone
$function$;
GRANT EXECUTE ON FUNCTION pgml._requests_expire() TO pgml_serving;

-- FUNCTION pgml._requests_release(serving_id text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._requests_release(serving_id text DEFAULT NULL::text)
 RETURNS TABLE(id bigint, status text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RETURN QUERY
    WITH lost AS (
        SELECT r.id FROM pgml.requests r
        WHERE r.status OPERATOR(pg_catalog.=) 'running'
          AND CASE WHEN serving_id IS NULL THEN r.lease_expires_at OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp()
                   ELSE r.claimed_by OPERATOR(pg_catalog.=) serving_id END
        FOR UPDATE SKIP LOCKED
    ), chunks AS (
        DELETE FROM pgml.request_chunks c USING lost WHERE c.request_id OPERATOR(pg_catalog.=) lost.id
    )
    UPDATE pgml.requests r
    SET status = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN 'queued' ELSE 'failed' END,
        error = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN NULL ELSE
            pg_catalog.format('the serving process %s stopped while answering (twice: killed, out of memory, or its '
                              'worker died); the request was not answered', r.claimed_by) END,
        answered_at = CASE WHEN r.attempts OPERATOR(pg_catalog.<) 2 THEN NULL ELSE pg_catalog.clock_timestamp() END,
        claimed_by = NULL, lease_expires_at = NULL,
        deadline = GREATEST(r.deadline, pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) interval '30 seconds')
    FROM lost
    WHERE r.id OPERATOR(pg_catalog.=) lost.id
    RETURNING r.id, r.status;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('pgml_requests', '{"type": "request_queued"}');
    END IF;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._requests_release(serving_id text) TO pgml_serving;

-- FUNCTION pgml._requests_renew(serving_id text, lease_seconds double precision), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._requests_renew(serving_id text, lease_seconds double precision)
 RETURNS SETOF bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    UPDATE pgml.requests r
    SET lease_expires_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => lease_seconds)
    WHERE r.claimed_by OPERATOR(pg_catalog.=) serving_id AND r.status OPERATOR(pg_catalog.=) 'running'
    RETURNING r.id
$function$;
GRANT EXECUTE ON FUNCTION pgml._requests_renew(serving_id text, lease_seconds double precision) TO pgml_serving;

-- FUNCTION pgml._require_admin(what text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._require_admin(what text)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NOT pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('%s is for administrators; %I is not a member of pgml_admin', what,
                                        session_user),
            HINT = 'ask a member of pgml_admin to run it';
    END IF;
END $function$;

-- FUNCTION pgml._resources_allowed(who name, resources jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._resources_allowed(who name, resources jsonb)
 RETURNS void
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._retrieval_call(fn text, transformer text, kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._retrieval_call(fn text, transformer text, kwargs jsonb)
 RETURNS void
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF transformer IS NULL OR pg_catalog.btrim(transformer) OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s needs a transformer (the model)', fn),
            HINT = 'a hub id, pgml:<project> (its deployed model), pgml:model:<id>, or one of your project names';
    END IF;
    IF kwargs IS NULL OR pg_catalog.jsonb_typeof(kwargs) OPERATOR(pg_catalog.<>) 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s: kwargs must be a JSON object, not %s', fn,
                                        coalesce(pg_catalog.jsonb_typeof(kwargs), 'NULL')),
            HINT = CASE fn WHEN 'embed' THEN 'e.g. ''{"normalize": true}''' ELSE 'e.g. ''{"top_k": 10}''' END;
    END IF;
    IF kwargs ? 'prompt' AND kwargs ? 'prompt_name' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.%s: kwargs prompt and prompt_name are both given', fn),
            HINT = 'pass one: "prompt" is the text put before each input, "prompt_name" names one of the model''s '
                   'prompts (e.g. "query")';
    END IF;
    IF fn OPERATOR(pg_catalog.=) 'embed_batch' THEN
        IF kwargs ? 'timeout' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = 'pgml.embed_batch: kwargs.timeout is for pgml.embed',
                HINT = 'a batch job has no timeout: leave it out (pgml.cancel stops a job)';
        END IF;
        PERFORM pgml._request_args_check('embed', kwargs);
    END IF;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._retrieval_call(fn text, transformer text, kwargs jsonb) TO pgml_user;

-- FUNCTION pgml._role_limits(who name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._role_limits(who name)
 RETURNS pgml.role_limits
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.role_limits;
BEGIN
    SELECT * INTO v FROM pgml.role_limits l WHERE l.role OPERATOR(pg_catalog.=) who;
    IF NOT FOUND AND NOT pg_catalog.pg_has_role(who, 'pgml_admin', 'MEMBER') THEN
        SELECT * INTO v FROM pgml.role_limits l WHERE l.role OPERATOR(pg_catalog.=) 'pgml_user';
    END IF;
    RETURN v;
END $function$;

-- FUNCTION pgml._seal(secrets jsonb, job_id bigint, submitter text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._seal(secrets jsonb, job_id bigint, submitter text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    sk       pgml.sealing_keys;
    max_len  integer;
    msg      bytea;
    n_blocks integer;
    blocks   text[] := '{}';
BEGIN
    IF secrets IS NULL OR secrets = '{}'::jsonb THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.jsonb_typeof(secrets) <> 'object' THEN
        RAISE EXCEPTION 'pgml._seal: secrets must be a jsonb object, not %', pg_catalog.jsonb_typeof(secrets)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO sk FROM pgml.sealing_keys k WHERE k.active;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = 'cannot seal the Hugging Face token: no sealing key is active',
            HINT = 'use a named credential instead ("hub_credential": "<name>", see pgml.allow_credential), or '
                   'an administrator registers a key: `pgml-tuned keys generate --out pgml-key.pem` then '
                   '`pgml-tuned keys register pgml-key.pem` (and copies the file into every worker''s keyring)';
    END IF;
    max_len := length(pgml._numeric_to_bytea(sk.n)) - 66;
    msg := pg_catalog.convert_to(secrets::text, 'UTF8');
    n_blocks := (length(msg) + max_len - 1) / max_len;
    FOR i IN 1 .. n_blocks LOOP
        blocks := blocks || pg_catalog.translate(pg_catalog.encode(
            pgml._oaep_encrypt(sk.n, sk.e, substring(msg FROM (i - 1) * max_len + 1 FOR max_len),
                               pgml._seal_label(job_id, submitter, i, n_blocks)),
            'base64'), E'\n', '');
    END LOOP;
    RETURN 'v2:' || sk.key_id || ':' || pg_catalog.array_to_string(blocks, '.');
END $function$;

-- FUNCTION pgml._seal_label(job_id bigint, submitter text, i integer, n integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._seal_label(job_id bigint, submitter text, i integer, n integer)
 RETURNS bytea
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT pg_catalog.convert_to('pgml-tuned:v2:' || job_id || ':' || submitter || ':' || i || '/' || n, 'UTF8') $function$;

-- FUNCTION pgml._secret_keys(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._secret_keys()
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$ SELECT ARRAY['token', 'hub_token', 'use_auth_token'] $function$;

-- FUNCTION pgml._serve(kind text, model text, args jsonb, inputs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._serve(kind text, model text, args jsonb, inputs jsonb)
 RETURNS jsonb
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pgml._await_request(pgml._serve_submit(kind, model, args, inputs), pgml._request_timeout(args))
$function$;

-- FUNCTION pgml._serve_submit(kind text, model text, args jsonb, inputs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._serve_submit(kind text, model text, args jsonb, inputs jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT (pgml._loopback(pgml._quick(pg_catalog.format('to_jsonb(pgml.request(%L, %L, %L::jsonb, %L::jsonb))',
                                                         kind, model, args, inputs))) OPERATOR(pg_catalog.#>>) '{}')::bigint
$function$;

-- FUNCTION pgml._serving_kinds(task text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._serving_kinds(task text)
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE task
        WHEN 'text-classification' THEN ARRAY['classify']
        WHEN 'text-pair-classification' THEN ARRAY['classify']
        WHEN 'conversation' THEN ARRAY['generate', 'chat']
        WHEN 'text-generation' THEN ARRAY['generate', 'chat']
        WHEN 'text-embedding' THEN ARRAY['embed']
        WHEN 'text-ranking' THEN ARRAY['rank']
        ELSE ARRAY[]::text[] END
$function$;

-- FUNCTION pgml._serving_model(submitter name, ref text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._serving_model(submitter name, ref text)
 RETURNS TABLE(id bigint, status text, base_model text, task text, project_name text)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    WITH who AS (
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                       WHERE r.rolname = submitter AND pg_catalog.pg_has_role(r.oid, 'pgml_admin', 'MEMBER')) AS admin
    ), by_id AS (
        SELECT m.id, m.status, m.base_model, m.task, p.name AS project_name
        FROM pgml.models m JOIN pgml.projects p ON p.id OPERATOR(pg_catalog.=) m.project_id, who
        WHERE ref OPERATOR(pg_catalog.~) '^model:[0-9]+$'
          AND m.id OPERATOR(pg_catalog.=) pg_catalog.substr(ref, 7)::bigint
          AND (m.owner OPERATOR(pg_catalog.=) submitter OR who.admin)
    ), project AS (
        SELECT p.id, p.name FROM pgml.projects p, who
        WHERE ref OPERATOR(pg_catalog.!~) '^model:' AND p.name OPERATOR(pg_catalog.=) ref
          AND (p.owner OPERATOR(pg_catalog.=) submitter OR who.admin)
        ORDER BY (p.owner OPERATOR(pg_catalog.=) submitter) DESC, p.id
        LIMIT 1
    ), deployed AS (
        SELECT m.id, m.status, m.base_model, m.task, pr.name AS project_name
        FROM project pr
        JOIN LATERAL (
            SELECT x.id FROM (
                (SELECT d.model_id AS id, 0 AS rank, d.id AS seq FROM pgml.deployments d
                 WHERE d.project_id OPERATOR(pg_catalog.=) pr.id ORDER BY d.id DESC LIMIT 1)
                UNION ALL
                (SELECT m2.id, 1, m2.id FROM pgml.models m2
                 WHERE m2.project_id OPERATOR(pg_catalog.=) pr.id AND m2.status OPERATOR(pg_catalog.=) 'successful'
                 ORDER BY m2.id DESC LIMIT 1)
            ) x ORDER BY x.rank, x.seq DESC LIMIT 1
        ) pick ON true
        JOIN pgml.models m ON m.id OPERATOR(pg_catalog.=) pick.id
    )
    SELECT * FROM by_id UNION ALL SELECT * FROM deployed
$function$;
GRANT EXECUTE ON FUNCTION pgml._serving_model(submitter name, ref text) TO pgml_serving;

-- FUNCTION pgml._serving_model_files(model_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._serving_model_files(model_id bigint)
 RETURNS TABLE(path text, part integer, data bytea)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT f.path, f.part, f.data FROM pgml.file_parts f JOIN pgml.models m ON m.id = f.model_id
    WHERE f.model_id = _serving_model_files.model_id
      AND EXISTS (SELECT 1 FROM pgml.requests r
                  WHERE r.status IN ('queued', 'running') AND pgml._may_read_model(m.owner, r.submitted_by))
    ORDER BY f.path, f.part
$function$;
GRANT EXECUTE ON FUNCTION pgml._serving_model_files(model_id bigint) TO pgml_serving;

-- FUNCTION pgml._setup_loopback(p_conninfo text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._setup_loopback(p_conninfo text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._split_secrets(hyperparams jsonb, OUT clean jsonb, OUT secrets jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._split_secrets(hyperparams jsonb, OUT clean jsonb, OUT secrets jsonb)
 RETURNS record
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._stale_loopback_logins(apply boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._stale_loopback_logins(apply boolean DEFAULT false)
 RETURNS TABLE(login name, dropped boolean, note text)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_may boolean := (SELECT r.rolsuper OR r.rolcreaterole FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);
BEGIN
    FOR login IN
        SELECT r.rolname FROM pg_catalog.pg_roles r
        WHERE r.rolname ~ '^pgml_loopback_[0-9]{1,10}$'
          AND r.rolcanlogin AND NOT r.rolsuper
          AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid AND g.rolname = 'pgml_loopback')
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d
                          WHERE d.oid::text = pg_catalog.substr(r.rolname, pg_catalog.length('pgml_loopback_') + 1))
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend s
                          WHERE s.refclassid = 'pg_catalog.pg_authid'::regclass AND s.refobjid = r.oid)
        ORDER BY r.rolname
    LOOP
        dropped := false;
        IF NOT v_may THEN
            note := format('its database is gone; not dropped: %s may not drop roles (an administrator with '
                           'CREATEROLE runs pgml-tuned gc --apply, or DROP ROLE %I)', current_user, login);
        ELSIF NOT apply THEN
            note := 'its database is gone (--apply drops it)';
        ELSE
            BEGIN
                EXECUTE format('DROP ROLE %I', login);
                dropped := true;
                note := 'its database is gone: dropped';
            EXCEPTION WHEN insufficient_privilege OR dependent_objects_still_exist OR undefined_object THEN
                note := format('its database is gone; not dropped: %s', SQLERRM);
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._stale_loopback_logins(apply boolean) TO pgml_admin;

-- FUNCTION pgml._submit(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, rel oid, rel_error text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._submit(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, rel oid, rel_error text)
 RETURNS TABLE(job_id bigint, project_id bigint, model_id bigint, relation text, columns text[])
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._submit(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, rel oid, rel_error text) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml._submit(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, rel oid, rel_error text) TO pgml_user;

-- FUNCTION pgml._submitted(job_id bigint, copied bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._submitted(job_id bigint, copied bigint DEFAULT NULL::bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._submitted(job_id bigint, copied bigint) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml._submitted(job_id bigint, copied bigint) TO pgml_user;

-- FUNCTION pgml._submitter(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._submitter()
 RETURNS name
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;

-- FUNCTION pgml._transform(task jsonb, args jsonb, inputs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._transform(task jsonb, args jsonb, inputs jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_task    text;
    v_kind    text;
    v_model   text;
    v_args    jsonb := coalesce(args, '{}');
BEGIN
    IF task IS NULL OR pg_catalog.jsonb_typeof(task) <> 'object' THEN
        RAISE EXCEPTION 'task must be a JSON object such as {"task": "text-classification", "model": "..."}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_task := task ->> 'task';
    v_model := task ->> 'model';
    v_kind := pgml._transform_kind(v_task);
    IF v_kind IS NULL THEN
        RAISE EXCEPTION 'pgml.transform does not serve task %', coalesce(pg_catalog.quote_literal(v_task), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'serve "text-classification", "text-generation" or "conversational"';
    END IF;
    IF v_model IS NULL OR pg_catalog.btrim(v_model) = '' THEN
        RAISE EXCEPTION 'pgml.transform needs a model: {"task": "%", "model": "..."}', v_task
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a hub id, pgml:<project> (its deployed model), pgml:model:<id>, or one of your project names';
    END IF;
    IF pg_catalog.jsonb_typeof(v_args) <> 'object' THEN
        RAISE EXCEPTION 'args must be a JSON object, not %', pg_catalog.jsonb_typeof(v_args)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the task object's other keys (e.g. "token", "load_in_8bit", "torch_dtype") are model options
    v_args := (task - 'task' - 'model') || v_args;
    RETURN pgml._serve(v_kind, v_model, v_args, inputs);
END $function$;

-- FUNCTION pgml._transform_kind(task text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._transform_kind(task text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE task
        WHEN 'text-classification' THEN 'classify'
        WHEN 'sentiment-analysis' THEN 'classify'
        WHEN 'text-generation' THEN 'generate'
        WHEN 'conversational' THEN 'chat'
        WHEN 'conversation' THEN 'chat'
        WHEN 'chat' THEN 'chat'
    END
$function$;

-- FUNCTION pgml._tune_loopback(step text, job_id bigint, args jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._tune_loopback(step text, job_id bigint DEFAULT NULL::bigint, args jsonb DEFAULT NULL::jsonb)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml._tune_loopback(step text, job_id bigint, args jsonb) TO pgml_user;

-- FUNCTION pgml._tune_request(), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._tune_request()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
END $function$;

-- FUNCTION pgml._vector_literals(flat real[], n integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._vector_literals(flat real[], n integer)
 RETURNS jsonb
 LANGUAGE plpgsql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_dim integer;
BEGIN
    IF flat IS NULL OR n IS NULL OR n OPERATOR(pg_catalog.<) 1 THEN
        RETURN NULL;
    END IF;
    v_dim := pg_catalog.cardinality(flat) OPERATOR(pg_catalog./) n;
    RETURN (SELECT pg_catalog.jsonb_agg(flat[(i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) v_dim OPERATOR(pg_catalog.+) 1
                                             : i OPERATOR(pg_catalog.*) v_dim]::text ORDER BY i)
            FROM pg_catalog.generate_series(1, n) AS i);
END $function$;

-- FUNCTION pgml._vectors(result jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._vectors(result jsonb)
 RETURNS SETOF real[]
 LANGUAGE sql
 IMMUTABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT (v.value OPERATOR(pg_catalog.#>>) '{}'::text[])::real[]
    FROM pg_catalog.jsonb_array_elements(result) WITH ORDINALITY AS v (value, n)
    ORDER BY v.n
$function$;

-- FUNCTION pgml._wait_advice(job_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._wait_advice(job_id bigint)
 RETURNS text
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.jobs;
    v_gpus integer;
    v_nodes integer;
    v_why text;
    v_holder record;
BEGIN
    SELECT * INTO v FROM pgml.jobs j WHERE j.id = _wait_advice.job_id;
    IF NOT FOUND OR NOT (v.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')) THEN
        RETURN NULL;
    END IF;
    v_gpus := coalesce((v.hyperparams -> 'resources' ->> 'gpus')::integer, 0);
    v_nodes := coalesce((v.hyperparams -> 'resources' ->> 'nodes')::integer, 1);
    IF v.status = 'queued' OR (v.status = 'running' AND v.gang_needed > 0) THEN
        v_why := pgml._fleet_shortfall(v_gpus, v_nodes);
        -- with no worker at all, say so once the job has waited a little (a daemon may be starting)
        IF v_why IS NOT NULL AND (v_gpus > 0 OR v_nodes > 1
                                  OR pg_catalog.clock_timestamp() - v.updated_at > interval '5 seconds') THEN
            RETURN format('job %s is %s, but %s: it waits until %s (pgml-tuned serve%s)',
                          v.id, CASE WHEN v.status = 'queued' THEN 'queued' ELSE 'forming its gang' END, v_why,
                          CASE WHEN v_nodes > 1 THEN format('%s workers are free at once', v_nodes)
                               ELSE 'one starts' END,
                          CASE WHEN v_gpus > 0 THEN format(' --gpus on a host with %s', v_gpus) END);
        END IF;
        IF v.status = 'running' THEN
            RETURN format('job %s is forming its gang: %s of %s workers joined; it starts when %s more join%s',
                          v.id, v_nodes - v.gang_needed, v_nodes, v.gang_needed,
                          CASE WHEN v.gang_needed = 1 THEN 's' ELSE '' END);
        END IF;
    ELSIF v.status = 'running' AND v.lease_expires_at < pg_catalog.clock_timestamp() THEN
        IF NOT EXISTS (SELECT 1 FROM pgml.worker_status w WHERE w.state IN ('live', 'late')) THEN
            SELECT w.state, w.heartbeat_at INTO v_holder FROM pgml.worker_status w WHERE w.id = v.worker;
            RETURN format('job %s: its worker %s stopped heartbeating (last heartbeat %s, lease expired %s) and no '
                          'live worker is left to take it over: it resumes (attempt %s of %s) when a worker starts '
                          '(pgml-tuned serve)', v.id, v.worker, coalesce(v_holder.heartbeat_at, v.heartbeat_at),
                          v.lease_expires_at, v.attempt + 1, v.max_attempts);
        END IF;
    END IF;
    RETURN NULL;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._wait_advice(job_id bigint) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml._wait_advice(job_id bigint) TO pgml_worker;

-- FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer, running bigint[], models_cached jsonb, serving jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer, running bigint[], models_cached jsonb, serving jsonb DEFAULT '{}'::jsonb)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);  -- a lost beat is beaten again (above)
    UPDATE pgml.workers w
    SET heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL,
        free_slots = greatest(0, _worker_heartbeat.free_slots), free_gpus = greatest(0, _worker_heartbeat.free_gpus),
        running = coalesce(_worker_heartbeat.running, '{}'),
        models_cached = CASE WHEN jsonb_typeof(_worker_heartbeat.models_cached) = 'array'
                             THEN _worker_heartbeat.models_cached ELSE '[]' END,
        serving = CASE WHEN jsonb_typeof(_worker_heartbeat.serving) = 'object'
                       THEN _worker_heartbeat.serving ELSE '{}' END
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._worker_heartbeat(worker_id text, token text, free_slots integer, free_gpus integer, running bigint[], models_cached jsonb, serving jsonb) TO pgml_worker;

-- FUNCTION pgml._worker_register(worker_id text, token text, host text, pid integer, version text, devices jsonb, gpus integer, concurrency integer, heartbeat_seconds real, lease_seconds real, cpus integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._worker_register(worker_id text, token text, host text, pid integer, version text, devices jsonb, gpus integer, concurrency integer, heartbeat_seconds real, lease_seconds real, cpus integer DEFAULT NULL::integer)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v pgml.workers;
BEGIN
    IF worker_id IS NULL OR length(worker_id) NOT BETWEEN 1 AND 200 OR coalesce(length(token), 0) < 16
       OR jsonb_typeof(devices) <> 'array' OR gpus < 0 OR concurrency < 1 OR heartbeat_seconds <= 0
       OR lease_seconds <= 0 OR cpus < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('pgml._worker_register: invalid registration of worker %L', worker_id),
            HINT = 'a worker id of 1 to 200 characters, a token of 16 or more, devices a JSON array';
    END IF;
    SELECT * INTO v FROM pgml.workers w WHERE w.id = worker_id FOR UPDATE;
    IF FOUND AND v.login <> session_user AND v.stopped_at IS NULL
       AND pg_catalog.clock_timestamp() - v.heartbeat_at <= pg_catalog.make_interval(secs => v.lease_seconds) THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation',
            MESSAGE = format('worker id %L is in use by a live worker (login %s, host %s, pid %s)', worker_id,
                             v.login, v.host, v.pid),
            HINT = 'give each daemon its own --worker-id (PGML_WORKER_ID)';
    END IF;
    INSERT INTO pgml.workers AS w (id, login, token_hash, host, pid, version, devices, gpus, concurrency,
                                   free_slots, free_gpus, heartbeat_seconds, lease_seconds, cpus)
    VALUES (worker_id, session_user, pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8')), host, pid, version,
            devices, gpus, concurrency, concurrency, gpus, heartbeat_seconds, lease_seconds, cpus)
    ON CONFLICT (id) DO UPDATE
    SET login = EXCLUDED.login, token_hash = EXCLUDED.token_hash, host = EXCLUDED.host, pid = EXCLUDED.pid,
        version = EXCLUDED.version, devices = EXCLUDED.devices, gpus = EXCLUDED.gpus, cpus = EXCLUDED.cpus,
        concurrency = EXCLUDED.concurrency, free_slots = EXCLUDED.free_slots, free_gpus = EXCLUDED.free_gpus,
        running = '{}', models_cached = '[]', serving = '{}', heartbeat_seconds = EXCLUDED.heartbeat_seconds,
        lease_seconds = EXCLUDED.lease_seconds, started_at = pg_catalog.clock_timestamp(),
        heartbeat_at = pg_catalog.clock_timestamp(), stopped_at = NULL;
    -- nobody needs rows of workers silent for a week
    DELETE FROM pgml.workers w WHERE w.heartbeat_at < pg_catalog.clock_timestamp() - interval '7 days';
END $function$;
GRANT EXECUTE ON FUNCTION pgml._worker_register(worker_id text, token text, host text, pid integer, version text, devices jsonb, gpus integer, concurrency integer, heartbeat_seconds real, lease_seconds real, cpus integer) TO pgml_worker;

-- FUNCTION pgml._worker_stop(worker_id text, token text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._worker_stop(worker_id text, token text)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    UPDATE pgml.workers w
    SET stopped_at = pg_catalog.clock_timestamp(), free_slots = 0, free_gpus = 0, running = '{}',
        models_cached = '[]', serving = '{}'
    WHERE w.id = worker_id AND w.token_hash = pg_catalog.sha256(pg_catalog.convert_to(token, 'UTF8'));
    RETURN FOUND;
END $function$;
GRANT EXECUTE ON FUNCTION pgml._worker_stop(worker_id text, token text) TO pgml_worker;

-- FUNCTION pgml._xor(a bytea, b bytea), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml._xor(a bytea, b bytea)
 RETURNS bytea
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    r bytea := a;
BEGIN
    IF length(a) <> length(b) THEN
        RAISE EXCEPTION 'pgml._xor: lengths differ (% and %)', length(a), length(b)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0 .. length(a) - 1 LOOP
        r := pg_catalog.set_byte(r, i, pg_catalog.get_byte(a, i) # pg_catalog.get_byte(b, i));
    END LOOP;
    RETURN r;
END $function$;

-- FUNCTION pgml.activate_sealing_key(key_id text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.activate_sealing_key(key_id text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._require_admin('activating a sealing key');
    PERFORM 1 FROM pgml.sealing_keys k WHERE k.key_id = activate_sealing_key.key_id AND k.retired_at IS NULL
        FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('no usable sealing key %L (unknown or retired)', activate_sealing_key.key_id),
            HINT = 'SELECT key_id, active, retired_at FROM pgml.sealing_keys lists them; register a new one with '
                   '`pgml-tuned keys register FILE`';
    END IF;
    UPDATE pgml.sealing_keys k SET active = false WHERE k.active AND k.key_id <> activate_sealing_key.key_id;
    UPDATE pgml.sealing_keys k SET active = true WHERE k.key_id = activate_sealing_key.key_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.activate_sealing_key(key_id text) TO pgml_admin;

-- FUNCTION pgml.allow_credential(name text, role name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.allow_credential(name text, role name)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._require_admin('allowing a credential');
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('%L is not a valid credential name', name),
            HINT = 'a credential is a file name on the workers: letters, digits, _ - and ., not starting with '
                   '. (e.g. ''my-org-token''), at most 128 characters';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = allow_credential.role) THEN
        RAISE EXCEPTION USING ERRCODE = 'undefined_object',
            MESSAGE = pg_catalog.format('role %I does not exist', role),
            HINT = 'name a login or a group role (e.g. pgml_user for everyone who may fine-tune)';
    END IF;
    INSERT INTO pgml.credentials (name) VALUES (allow_credential.name) ON CONFLICT DO NOTHING;
    INSERT INTO pgml.credential_grants (credential, role) VALUES (allow_credential.name, allow_credential.role)
    ON CONFLICT DO NOTHING;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.allow_credential(name text, role name) TO pgml_admin;

-- FUNCTION pgml.cancel(job_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.cancel(job_id bigint)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_who   name := pgml._submitter();
    v_status text;
BEGIN
    UPDATE pgml.jobs j
    SET cancel_requested = true,
        status = CASE WHEN j.status = 'queued' THEN 'cancelled' ELSE j.status END,
        error = CASE WHEN j.status = 'queued' THEN 'cancelled by ' || v_who ELSE j.error END,
        finished_at = CASE WHEN j.status = 'queued' THEN clock_timestamp() ELSE j.finished_at END,
        updated_at = clock_timestamp()
    WHERE j.id = cancel.job_id AND j.status IN ('queued', 'running')
      AND (j.submitted_by = v_who OR pg_has_role(v_who, 'pgml_admin', 'MEMBER'))
    RETURNING j.status INTO v_status;
    IF v_status = 'running' THEN
        -- every worker running something renews its leases at once; the renewal reads cancel_requested from the
        -- row (the payload names no job: anyone may LISTEN on pgml_control)
        PERFORM pg_catalog.pg_notify('pgml_control', '{"type": "cancel_requested"}');
        RETURN 'cancelling';
    ELSIF v_status IS NOT NULL THEN
        RETURN v_status;
    END IF;
    SELECT j.status INTO v_status FROM pgml.jobs j WHERE j.id = cancel.job_id
        AND (j.submitted_by = v_who OR pg_has_role(v_who, 'pgml_admin', 'MEMBER'));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('no job %s', cancel.job_id), ERRCODE = 'no_data_found',
            HINT = 'SELECT id, status FROM pgml.jobs ORDER BY id DESC lists your jobs';
    END IF;
    RETURN v_status;  -- already succeeded, failed or cancelled
END $function$;
GRANT EXECUTE ON FUNCTION pgml.cancel(job_id bigint) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml.cancel(job_id bigint) TO pgml_user;

-- FUNCTION pgml.check_hub_model(model_name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.check_hub_model(model_name text)
 RETURNS void
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pgml._refuse_hub_model(check_hub_model.model_name, session_user)
$function$;
GRANT EXECUTE ON FUNCTION pgml.check_hub_model(model_name text) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.check_hub_model(model_name text) TO pgml_worker;

-- FUNCTION pgml.deploy(project_name text, model_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.deploy(project_name text, model_id bigint)
 RETURNS TABLE(project text, rule text, deployed_model_id bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml.deploy(project_name text, model_id bigint) TO pgml_user;

-- FUNCTION pgml.deploy(project_name text, strategy text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.deploy(project_name text, strategy text DEFAULT 'best_score'::text)
 RETURNS TABLE(project text, rule text, deployed_model_id bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml.deploy(project_name text, strategy text) TO pgml_user;

-- FUNCTION pgml.deployed_model(p_project_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.deployed_model(p_project_id bigint)
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pgml._deployed_model(p.id) FROM pgml.projects p
    WHERE p.id = p_project_id
      AND (p.owner = pgml._submitter() OR pg_catalog.pg_has_role(pgml._submitter(), 'pgml_admin', 'MEMBER')
           OR pg_catalog.pg_has_role(session_user, 'pgml_worker', 'MEMBER'))
$function$;
GRANT EXECUTE ON FUNCTION pgml.deployed_model(p_project_id bigint) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.deployed_model(p_project_id bigint) TO pgml_worker;

-- FUNCTION pgml.drop_credential(name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.drop_credential(name text)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._require_admin('dropping a credential');
    DELETE FROM pgml.credentials c WHERE c.name = drop_credential.name;
    RETURN FOUND;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.drop_credential(name text) TO pgml_admin;

-- FUNCTION pgml.embed(transformer text, inputs text[], kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.embed(transformer text, inputs text[], kwargs jsonb DEFAULT '{}'::jsonb)
 RETURNS SETOF real[]
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('embed', transformer, kwargs);
    IF pg_catalog.cardinality(inputs) OPERATOR(pg_catalog.=) 0 THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT v FROM pgml._embedded(transformer, kwargs, inputs) v;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.embed(transformer text, inputs text[], kwargs jsonb) TO pgml_user;

-- FUNCTION pgml.embed(transformer text, text text, kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.embed(transformer text, text text, kwargs jsonb DEFAULT '{}'::jsonb)
 RETURNS real[]
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('embed', transformer, kwargs);
    IF embed.text IS NULL THEN
        RETURN NULL;  -- a row with no text gets no vector (UPDATE ... SET embedding = pgml.embed(...))
    END IF;
    RETURN (SELECT v FROM pgml._embedded(transformer, kwargs, ARRAY[embed.text]) v LIMIT 1);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.embed(transformer text, text text, kwargs jsonb) TO pgml_user;

-- FUNCTION pgml.embed_batch(transformer text, relation_name text, output_table text, text_column text, key_column text, kwargs jsonb, batch_size integer, priority integer, caller_search_path text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.embed_batch(transformer text, relation_name text, output_table text, text_column text DEFAULT 'text'::text, key_column text DEFAULT 'id'::text, kwargs jsonb DEFAULT '{}'::jsonb, batch_size integer DEFAULT 64, priority integer DEFAULT 0, caller_search_path text DEFAULT current_setting('search_path'::text))
 RETURNS TABLE(job_id bigint, status text, output text)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml.embed_batch(transformer text, relation_name text, output_table text, text_column text, key_column text, kwargs jsonb, batch_size integer, priority integer, caller_search_path text) TO pgml_user;

-- FUNCTION pgml.gc(keep_last integer, logs_older_than interval, include_kept boolean, apply boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.gc(keep_last integer DEFAULT 1, logs_older_than interval DEFAULT NULL::interval, include_kept boolean DEFAULT false, apply boolean DEFAULT false)
 RETURNS TABLE(kind text, project text, job_id bigint, model_id bigint, items bigint, bytes bigint, note text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_cutoff timestamptz;
    r record;
BEGIN
    IF NOT pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('pgml.gc: %s is not a member of pgml_admin', session_user),
            HINT = 'run pgml-tuned gc as an administrator''s login (GRANT pgml_admin TO <login>)';
    END IF;
    IF keep_last IS NULL OR keep_last < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.gc: keep_last must be at least 1, not %s', keep_last),
            HINT = 'every project keeps its newest model (and its deployed and its best); --keep-last 1 keeps no more';
    END IF;
    IF logs_older_than IS NOT NULL AND logs_older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.gc: logs_older_than must not be negative (%s)', logs_older_than),
            HINT = 'give an age such as ''30 days''';
    END IF;
    v_cutoff := pg_catalog.clock_timestamp() - logs_older_than;
    FOR r IN SELECT * FROM pgml._gc_candidates(keep_last, v_cutoff, include_kept) c ORDER BY c.kind, c.project, c.model_id, c.job_id LOOP
        IF apply THEN
            IF r.kind = 'model_files' THEN
                -- checked again at the delete: a model deployed since the listing keeps its files
                DELETE FROM pgml.file_parts fp
                WHERE fp.model_id = r.model_id
                  AND r.model_id IS DISTINCT FROM (SELECT pgml._deployed_model(m.project_id) FROM pgml.models m
                                                   WHERE m.id = r.model_id);
                IF FOUND THEN
                    UPDATE pgml.models m SET files_freed_at = pg_catalog.clock_timestamp() WHERE m.id = r.model_id;
                END IF;
            ELSIF r.kind = 'logs' THEN
                DELETE FROM pgml.logs lg WHERE lg.model_id = r.model_id AND lg.created_at < v_cutoff;
            ELSIF r.kind = 'checkpoints' THEN
                DELETE FROM pgml.checkpoints ck WHERE ck.job_id = r.job_id
                  AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job_id
                              AND j.status IN ('succeeded', 'failed', 'cancelled'));
            ELSIF r.kind = 'job_rows' THEN
                DELETE FROM pgml.job_rows jr WHERE jr.job_id = r.job_id
                  AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job_id
                              AND j.status IN ('succeeded', 'failed', 'cancelled'));
            END IF;
        END IF;
        kind := r.kind; project := r.project; job_id := r.job_id; model_id := r.model_id;
        items := r.items; bytes := r.bytes; note := r.note;
        RETURN NEXT;
    END LOOP;
    -- A job committed while 'submitting' (possible before the constraint trigger jobs_submitted_at_commit,
    -- 50_submit.sql: pgml._submit called on its own) was never queued and never will be: it goes, with its model
    -- row and its table. (Another session's submission in progress is not committed, so not seen here.)
    FOR r IN
        SELECT j.id AS job, j.model_id, p.name AS project, j.created_at,
               pg_catalog.pg_total_relation_size(pg_catalog.to_regclass(
                   pg_catalog.format('pgml_rows.%I', pgml._job_table(j.id)))) AS size
        FROM pgml.jobs j JOIN pgml.projects p ON p.id = j.project_id
        WHERE j.status = 'submitting'
        ORDER BY j.id
    LOOP
        kind := 'submitting'; project := r.project; job_id := r.job; model_id := r.model_id; items := 1;
        bytes := coalesce(r.size, 0);
        note := pg_catalog.format('job %s left in ''submitting'' since %s (never queued)', r.job, r.created_at);
        IF apply THEN
            -- the job goes with its model (ON DELETE CASCADE); its table with the job (jobs_tables_deleted)
            DELETE FROM pgml.models m WHERE m.id = r.model_id
              AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job AND j.status = 'submitting')
              AND NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.model_id = r.model_id AND j.id <> r.job);
            DELETE FROM pgml.jobs j WHERE j.id = r.job AND j.status = 'submitting';
        END IF;
        RETURN NEXT;
    END LOOP;
    -- A job's rows in a table of its own (pgml_rows.job_<id>, when a later migration keeps them there): dropped
    -- when the job ended and nothing keeps it, or when its job is gone. Dropping returns the space at once.
    FOR r IN
        SELECT c.relname::text AS relname, j.id AS job, p.name AS project, j.keep_snapshot AS kept,
               pg_catalog.pg_total_relation_size(c.oid) AS size
        FROM pg_catalog.pg_class c
        LEFT JOIN pgml.jobs j ON j.id = CASE WHEN c.relname ~ '^job_[0-9]{1,18}$'
                                             THEN pg_catalog.substr(c.relname::text, 5)::bigint END
        LEFT JOIN pgml.projects p ON p.id = j.project_id
        WHERE c.relnamespace = pg_catalog.to_regnamespace('pgml_rows') AND c.relkind = 'r'
          AND c.relname ~ '^job_[0-9]{1,18}$'
          AND (j.id IS NULL OR (j.status IN ('succeeded', 'failed', 'cancelled') AND (include_kept OR NOT j.keep_snapshot)))
        ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM pgml_rows.%I', r.relname) INTO items;
        kind := 'job_table'; project := r.project; job_id := r.job; model_id := NULL; bytes := r.size;
        note := CASE WHEN r.job IS NULL THEN pg_catalog.format('pgml_rows.%I: its job is gone', r.relname)
                     WHEN r.kept THEN pg_catalog.format('pgml_rows.%I: kept by materialize_snapshot', r.relname)
                     ELSE pg_catalog.format('pgml_rows.%I: left by an ended job', r.relname) END;
        IF apply AND NOT pgml._drop_unlocked('pgml_rows', r.relname) THEN  -- never waits on a user's lock
            note := note || ' (in use: not dropped; the workers'' sweep drops it once it is free)';
        END IF;
        RETURN NEXT;
    END LOOP;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.gc(keep_last integer, logs_older_than interval, include_kept boolean, apply boolean) TO pgml_admin;

-- FUNCTION pgml.hub_allow(pattern text, note text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.hub_allow(pattern text, note text DEFAULT NULL::text)
 RETURNS pgml.hub_allowlist
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_row pgml.hub_allowlist;
BEGIN
    IF hub_allow.pattern = '*' THEN
        RAISE EXCEPTION USING MESSAGE = 'pattern ''*'' would allow every hub model',
            HINT = 'an empty allow-list allows every hub model: remove the entries instead '
            '(SELECT pgml.hub_disallow(pattern) FROM pgml.hub_allowlist)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF hub_allow.pattern IS NULL
       OR NOT (hub_allow.pattern ~ '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$'
               OR hub_allow.pattern ~ '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]*)?\*$') THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a hub model id or pattern', coalesce(quote_literal(hub_allow.pattern),
                                                                                  'NULL')),
            HINT = 'write an exact id (''org/name'', or a legacy ''name'') or a prefix ending in * (''org/*'', '
            '''org/bert-*''); stored models (pgml:...) and worker directories are not subject to the list',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pgml.hub_allowlist AS a (pattern, note, added_by)
    VALUES (lower(hub_allow.pattern), hub_allow.note, session_user)
    ON CONFLICT ON CONSTRAINT hub_allowlist_pkey
        DO UPDATE SET note = coalesce(EXCLUDED.note, a.note), added_by = EXCLUDED.added_by,
                      added_at = clock_timestamp()
    RETURNING * INTO v_row;
    RETURN v_row;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.hub_allow(pattern text, note text) TO pgml_admin;

-- FUNCTION pgml.hub_disallow(pattern text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.hub_disallow(pattern text)
 RETURNS pgml.hub_allowlist
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_row pgml.hub_allowlist;
BEGIN
    DELETE FROM pgml.hub_allowlist a WHERE a.pattern = lower(hub_disallow.pattern) RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('no allow-list entry %L', hub_disallow.pattern),
            HINT = 'SELECT pattern FROM pgml.hub_allowlist lists them (patterns are stored in lower case)';
    END IF;
    RETURN v_row;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.hub_disallow(pattern text) TO pgml_admin;

-- FUNCTION pgml.hub_model_allowed(model_name text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.hub_model_allowed(model_name text)
 RETURNS boolean
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT NOT pgml._is_hub_id(model_name)
        OR NOT EXISTS (SELECT 1 FROM pgml.hub_allowlist)
        OR EXISTS (SELECT 1 FROM pgml.hub_allowlist a WHERE pgml._hub_pattern_matches(a.pattern, model_name))
$function$;
GRANT EXECUTE ON FUNCTION pgml.hub_model_allowed(model_name text) TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.hub_model_allowed(model_name text) TO pgml_worker;

-- FUNCTION pgml.import_model_begin(project_name text, task text, base_model text, files jsonb, source text, owner name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.import_model_begin(project_name text, task text, base_model text, files jsonb, source text DEFAULT NULL::text, owner name DEFAULT NULL::name)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_who     name := pgml._submitter();
    v_owner   name := coalesce(import_model_begin.owner, pgml._submitter());
    v_project pgml.projects;
    v_model   bigint;
    v_file    jsonb;
    v_paths   text[] := ARRAY[]::text[];
    v_bytes   bigint := 0;
    v_bad     record;
    v_adapter boolean;
    v_ref     text;
    v_found   record;
BEGIN
    IF v_owner <> v_who AND NOT pg_has_role(v_who, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING MESSAGE = format('%s may not import a model into a project of %s: only administrators import '
                                  'models for another login', v_who, v_owner),
            HINT = format('import it into a project of your own (leave the owner out), or ask a member of '
                                  'pgml_admin to import it for %s', v_owner),
            ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = v_owner AND pg_has_role(r.oid, 'pgml_user', 'MEMBER')) THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a pgml_user login: its models could not be used', v_owner),
            HINT = format('GRANT pgml_user TO %I, or import for another login', v_owner),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF project_name IS NULL OR btrim(project_name) = '' OR length(project_name) > 200 THEN
        RAISE EXCEPTION USING MESSAGE = 'an import needs a project name (at most 200 characters)',
            HINT = 'pgml-tuned models import DIR --project NAME: the model is then pgml:NAME',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF task IS NULL OR task NOT IN ('text-classification', 'text-pair-classification', 'conversation') THEN
        RAISE EXCEPTION USING MESSAGE = format('task %s cannot be imported', coalesce(quote_literal(task), 'NULL')),
            HINT = 'imported models are of task text-classification, text-pair-classification or '
                           'conversation (causal language models)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name AND p.owner = v_owner;
    IF FOUND AND v_project.task <> task THEN
        RAISE EXCEPTION USING MESSAGE = format('project %L is a %s project, not %s', project_name, v_project.task, task),
            HINT = 'import it into another project (--project), or give the project''s task (--task)',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- the files: a list of paths and sizes, each path allowed, config.json or adapter_config.json among them
    IF files IS NULL OR jsonb_typeof(files) <> 'array' OR jsonb_array_length(files) = 0
       OR jsonb_array_length(files) > 10000 THEN
        RAISE EXCEPTION USING MESSAGE = 'files must be a JSON array of {"path": ..., "bytes": ...}, one per file of the model',
            HINT = 'pgml-tuned models import DIR lists them',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_file IN SELECT value FROM jsonb_array_elements(files) LOOP
        IF jsonb_typeof(v_file) <> 'object' OR jsonb_typeof(v_file -> 'path') <> 'string'
           OR jsonb_typeof(v_file -> 'bytes') <> 'number' OR (v_file ->> 'bytes') !~ '^[0-9]{1,15}$' THEN
            RAISE EXCEPTION USING MESSAGE = format('files: %s is not {"path": text, "bytes": integer}', left(v_file::text, 200)),
                HINT = 'pgml-tuned models import DIR lists them',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO v_bad FROM pgml._import_file_refusal(v_file ->> 'path');
        IF v_bad.message IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = v_bad.message,
                HINT = v_bad.hint,
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF (v_file ->> 'path') = ANY (v_paths) THEN
            RAISE EXCEPTION USING MESSAGE = format('files: %L is listed twice', v_file ->> 'path'),
                HINT = 'list each file once',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        v_paths := v_paths || (v_file ->> 'path');
        v_bytes := v_bytes + (v_file ->> 'bytes')::bigint;
    END LOOP;
    v_adapter := 'adapter_config.json' = ANY (v_paths);
    IF NOT v_adapter AND NOT 'config.json' = ANY (v_paths) THEN
        RAISE EXCEPTION USING MESSAGE = 'the model has no config.json (nor adapter_config.json): it is not a saved transformers '
                           'model or PEFT adapter',
            HINT = 'import the directory save_pretrained wrote (config.json, model.safetensors, the '
                           'tokenizer''s files)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM unnest(v_paths) p WHERE p LIKE '%.safetensors') THEN
        RAISE EXCEPTION USING MESSAGE = 'the model has no .safetensors weights',
            HINT = 'save it with save_pretrained(DIR, safe_serialization=True) and import that directory',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- an adapter's base: resolvable now, under the rules every model_name follows, for the owner
    IF NOT v_adapter THEN
        IF base_model IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L given for a full model (it has no adapter_config.json)',
                                      base_model),
                HINT = 'a full model loads on its own: leave --base out',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF base_model IS NULL OR btrim(base_model) = '' THEN
        RAISE EXCEPTION USING MESSAGE = 'the adapter names no base model',
            HINT = 'pass --base (pgml:<project>, pgml:model:<id>, or a hub id on the allow-list), or set '
                           'base_model_name_or_path in its adapter_config.json',
            ERRCODE = 'invalid_parameter_value';
    ELSIF starts_with(base_model, 'pgml:') THEN
        v_ref := substr(base_model, 6);
        IF starts_with(v_ref, 'model:') AND substr(v_ref, 7) !~ '^[0-9]{1,18}$' THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L: write pgml:model:<id> with a numeric id', base_model),
                HINT = 'SELECT id FROM pgml.models lists them',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO v_found FROM pgml._model_ref(CASE WHEN starts_with(v_ref, 'model:') THEN substr(v_ref, 7)::bigint END,
                                                   CASE WHEN NOT starts_with(v_ref, 'model:') THEN v_ref END, v_owner) r;
        IF v_found.id IS NULL OR v_found.status <> 'successful' THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L: %s has no such successful model', base_model, v_owner),
                HINT = 'name a model the owner may read: pgml:<project> (SELECT name FROM pgml.projects), '
                               'pgml:model:<id>, or import the base first',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF starts_with(base_model, '/') THEN
        NULL;  -- a directory under the workers' model directories: each worker checks it when it loads the base
    ELSIF base_model ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$' AND strpos(base_model, '..') = 0
          AND strpos(base_model, '--') = 0 AND length(base_model) <= 96 THEN
        SELECT * INTO v_bad FROM pgml._hub_refusal(base_model, v_owner);
        IF v_bad.message IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = v_bad.message,
                HINT = v_bad.hint,
                ERRCODE = 'insufficient_privilege';
        END IF;
    ELSE
        RAISE EXCEPTION USING MESSAGE = format('base model %L is not a model reference', base_model),
            HINT = 'name a hub id (org/name), a stored model (pgml:<project> or pgml:model:<id>), or an '
                           'absolute directory under the workers'' model directories',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pgml.projects AS p (name, task, owner) VALUES (project_name, task, v_owner)
    ON CONFLICT ON CONSTRAINT projects_owner_name_key DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;
    SET CONSTRAINTS pgml.models_import_finished DEFERRED;  -- checked at COMMIT, whatever the caller set
    INSERT INTO pgml.models (project_id, status, task, model_name, base_model, hyperparams, owner)
    VALUES (v_project.id, 'in_progress', task, coalesce(left(source, 1000), 'import'),
            CASE WHEN v_adapter THEN base_model END,
            jsonb_build_object('import', jsonb_build_object('by', v_who, 'source', left(source, 1000), 'files', files,
                                                            'bytes', v_bytes)),
            v_owner)
    RETURNING id INTO v_model;
    PERFORM set_config('pgml.import_model', v_model::text, true);
    RETURN v_model;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.import_model_begin(project_name text, task text, base_model text, files jsonb, source text, owner name) TO pgml_user;

-- FUNCTION pgml.import_model_finish(model_id bigint), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.import_model_finish(model_id bigint)
 RETURNS TABLE(id bigint, project_name text, owner name, files integer, bytes bigint, ref text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_model   pgml.models;
    v_project pgml.projects;
    v_bad     record;
    v_path    text;
    v_config  jsonb;
    v_files   integer;
    v_bytes   bigint;
BEGIN
    SELECT * INTO v_model FROM pgml.models m WHERE m.id = import_model_finish.model_id;
    IF NOT FOUND OR NOT (v_model.hyperparams ? 'import') OR v_model.status <> 'in_progress'
       OR v_model.hyperparams -> 'import' ->> 'by' IS DISTINCT FROM pgml._submitter()::text
       OR current_setting('pgml.import_model', true) IS DISTINCT FROM v_model.id::text THEN
        RAISE EXCEPTION USING MESSAGE = format('model %s is not an import this transaction began', import_model_finish.model_id),
            HINT = 'SELECT pgml.import_model_begin(...), COPY its files, then pgml.import_model_finish(id), '
                           'in one transaction (pgml-tuned models import does)',
            ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- each listed file stored whole (parts 0..n-1, its size), nothing else stored
    SELECT l.path AS listed, s.path AS stored, l.bytes AS want, s.bytes AS got, s.parts, s.last_part
    INTO v_bad
    FROM (SELECT e ->> 'path' AS path, (e ->> 'bytes')::bigint AS bytes
          FROM jsonb_array_elements(v_model.hyperparams -> 'import' -> 'files') e) l
    FULL JOIN (SELECT f.path, sum(length(f.data))::bigint AS bytes, count(*) AS parts, max(f.part) AS last_part
               FROM pgml.file_parts f WHERE f.model_id = v_model.id GROUP BY f.path) s ON s.path = l.path
    WHERE l.path IS NULL OR s.path IS NULL OR l.bytes <> s.bytes OR s.parts <> s.last_part + 1
    ORDER BY coalesce(l.path, s.path) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING MESSAGE = CASE WHEN v_bad.listed IS NULL THEN format('file %L was stored but not listed', v_bad.stored)
                                WHEN v_bad.stored IS NULL THEN format('file %L was listed but not stored', v_bad.listed)
                                ELSE format('file %L: %s bytes listed, %s stored', v_bad.listed, v_bad.want, v_bad.got)
                           END,
            HINT = 'the directory changed while it was imported, or the client sent other files: import it '
                           'again',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the stored configuration: valid JSON, no code of the model's own (auto_map, trust_remote_code)
    FOREACH v_path IN ARRAY ARRAY['config.json', 'tokenizer_config.json', 'adapter_config.json',
                                  'generation_config.json', 'preprocessor_config.json', 'processor_config.json',
                                  'special_tokens_map.json'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pgml.file_parts f WHERE f.model_id = v_model.id AND f.path = v_path);
        BEGIN
            v_config := pgml._import_file_text(v_model.id, v_path)::jsonb;
        EXCEPTION WHEN invalid_text_representation OR character_not_in_repertoire OR untranslatable_character THEN
            RAISE EXCEPTION USING MESSAGE = format('%s is not valid JSON', v_path),
                HINT = format('fix or remove %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END;
        IF jsonb_path_exists(v_config, 'lax $.**.auto_map') THEN
            RAISE EXCEPTION USING MESSAGE = format('%s has an "auto_map": the model needs code of its own (trust_remote_code), '
                                      'which pgml-tuned never runs', v_path),
                HINT = format('import a model of an architecture transformers has built in; if it is one, '
                                      'delete "auto_map" from %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_path_exists(v_config, 'lax $.**.trust_remote_code ? (@ == true)') THEN
            RAISE EXCEPTION USING MESSAGE = format('%s sets trust_remote_code: pgml-tuned never runs a model''s own code', v_path),
                HINT = format('delete trust_remote_code from %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- safetensors: 8 bytes of header length, then that much JSON header, inside the file
    SELECT f.path INTO v_path FROM pgml.file_parts f
    WHERE f.model_id = v_model.id AND f.part = 0 AND f.path LIKE '%.safetensors'
      AND (length(f.data) < 8
           OR (get_byte(f.data, 0)::bigint + get_byte(f.data, 1)::bigint * 256 + get_byte(f.data, 2)::bigint * 65536
               + get_byte(f.data, 3)::bigint * 16777216 + get_byte(f.data, 4)::bigint * 4294967296) + 8
              > (SELECT sum(length(g.data)) FROM pgml.file_parts g WHERE g.model_id = v_model.id AND g.path = f.path)
           OR get_byte(f.data, 5) <> 0 OR get_byte(f.data, 6) <> 0 OR get_byte(f.data, 7) <> 0)
    ORDER BY f.path LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a safetensors file (its header is cut short or not there)', v_path),
            HINT = 'save the weights again with save_pretrained(DIR, safe_serialization=True)',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT count(DISTINCT f.path), coalesce(sum(length(f.data)), 0) INTO v_files, v_bytes
    FROM pgml.file_parts f WHERE f.model_id = v_model.id;
    UPDATE pgml.models m SET status = 'successful', updated_at = clock_timestamp() WHERE m.id = v_model.id;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.id = v_model.project_id;
    INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
    VALUES (v_project.id, v_model.id, 'import', pgml._submitter());
    PERFORM pg_notify('pgml_deployments', '{"type": "deployed"}');  -- naming nothing (issue 20)
    PERFORM set_config('pgml.import_model', '', true);
    RETURN QUERY SELECT v_model.id, v_project.name, v_project.owner, v_files, v_bytes,
                        format('pgml:%s', v_project.name);
END $function$;
GRANT EXECUTE ON FUNCTION pgml.import_model_finish(model_id bigint) TO pgml_user;

-- FUNCTION pgml.job_credential(job_id bigint, attempt integer), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.job_credential(job_id bigint, attempt integer)
 RETURNS text
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job pgml.jobs;
BEGIN
    SELECT * INTO v_job FROM pgml.jobs j
    WHERE j.id = job_credential.job_id AND j.attempt = job_credential.attempt AND j.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('job %s is not running attempt %s', job_credential.job_id,
                                        job_credential.attempt),
            HINT = 'only the worker that owns an attempt asks for its credential';
    END IF;
    IF v_job.credential IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgml.credentials c WHERE c.name = v_job.credential) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('credential %L no longer exists', v_job.credential),
            HINT = pg_catalog.format('an administrator allows it again (SELECT pgml.allow_credential(%L, %L)), '
                                     'then resubmit the job', v_job.credential, v_job.submitted_by);
    END IF;
    IF NOT pgml._may_use_credential(v_job.submitted_by, v_job.credential) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('%s may no longer use credential %L', v_job.submitted_by, v_job.credential),
            HINT = pg_catalog.format('an administrator allows it again (SELECT pgml.allow_credential(%L, %L)), '
                                     'then resubmit the job', v_job.credential, v_job.submitted_by);
    END IF;
    RETURN v_job.credential;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.job_credential(job_id bigint, attempt integer) TO pgml_worker;

-- FUNCTION pgml.load_dataset(source text, subset text, "limit" integer, kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.load_dataset(source text, subset text DEFAULT NULL::text, "limit" integer DEFAULT NULL::integer, kwargs jsonb DEFAULT '{}'::jsonb)
 RETURNS TABLE(table_name text, rows bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml.load_dataset(source text, subset text, "limit" integer, kwargs jsonb) TO pgml_user;

-- FUNCTION pgml.load_dataset_async(source text, subset text, "limit" integer, kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.load_dataset_async(source text, subset text DEFAULT NULL::text, "limit" integer DEFAULT NULL::integer, kwargs jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
COMMENT ON FUNCTION pgml.load_dataset_async(source text, subset text, "limit" integer, kwargs jsonb) IS 'Queue loading a Hugging Face dataset (or a file in the workers'' datasets directory) into pgml."<source>". Returns the job id at once; CALL pgml.wait(id) follows it, pgml._dataset_result(id) returns (table_name, rows).';
GRANT EXECUTE ON FUNCTION pgml.load_dataset_async(source text, subset text, "limit" integer, kwargs jsonb) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml.load_dataset_async(source text, subset text, "limit" integer, kwargs jsonb) TO pgml_user;

-- FUNCTION pgml.predict_batch(model text, relation_name text, output_table text, text_column text, key_column text, batch_size integer, max_length integer, priority integer, caller_search_path text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.predict_batch(model text, relation_name text, output_table text, text_column text DEFAULT 'text'::text, key_column text DEFAULT 'id'::text, batch_size integer DEFAULT 64, max_length integer DEFAULT NULL::integer, priority integer DEFAULT 0, caller_search_path text DEFAULT current_setting('search_path'::text))
 RETURNS TABLE(job_id bigint, status text, output text)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
GRANT EXECUTE ON FUNCTION pgml.predict_batch(model text, relation_name text, output_table text, text_column text, key_column text, batch_size integer, max_length integer, priority integer, caller_search_path text) TO pgml_user;

-- FUNCTION pgml.rank(transformer text, query text, documents text[], kwargs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.rank(transformer text, query text, documents text[], kwargs jsonb DEFAULT '{}'::jsonb)
 RETURNS TABLE(corpus_id integer, score double precision, text text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_scores jsonb;
    v_docs   boolean;
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    PERFORM pgml._retrieval_call('rank', transformer, kwargs);
    IF query IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'pgml.rank: the query is NULL',
            HINT = 'pass the text the documents are ranked for';
    END IF;
    IF pg_catalog.cardinality(documents) OPERATOR(pg_catalog.=) 0 THEN
        RETURN;
    END IF;
    v_scores := pgml._serve('rank', transformer, kwargs, pg_catalog.to_jsonb(ARRAY[query] OPERATOR(pg_catalog.||) documents));
    v_docs := coalesce((kwargs ->> 'return_documents')::boolean, true);
    RETURN QUERY
    SELECT (s.n OPERATOR(pg_catalog.-) 1)::integer, (s.value #>> '{}')::double precision,
           CASE WHEN v_docs THEN documents[s.n::integer] END
    FROM pg_catalog.jsonb_array_elements(v_scores) WITH ORDINALITY AS s (value, n)
    ORDER BY (s.value #>> '{}')::double precision DESC, s.n
    LIMIT (kwargs ->> 'top_k')::numeric::bigint;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.rank(transformer text, query text, documents text[], kwargs jsonb) TO pgml_user;

-- FUNCTION pgml.register_sealing_key(n numeric, e numeric, activate boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.register_sealing_key(n numeric, e numeric, activate boolean DEFAULT true)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_id text;
BEGIN
    PERFORM pgml._require_admin('registering a sealing key');
    IF n IS NULL OR e IS NULL OR n <= 0 OR length(pgml._numeric_to_bytea(trunc(n))) < 256 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'a sealing key needs an RSA modulus of at least 2048 bits',
            HINT = 'generate one with `pgml-tuned keys generate --out FILE` (RSA-3072)';
    END IF;
    v_id := pgml._key_fingerprint(n);
    INSERT INTO pgml.sealing_keys (key_id, n, e) VALUES (v_id, n, e) ON CONFLICT (key_id) DO NOTHING;
    IF activate THEN
        PERFORM pgml.activate_sealing_key(v_id);
    END IF;
    RETURN v_id;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.register_sealing_key(n numeric, e numeric, activate boolean) TO pgml_admin;

-- FUNCTION pgml.request(kind text, model text, args jsonb, inputs jsonb), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.request(kind text, model text, args jsonb, inputs jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT pgml._request_submit(pgml._submitter(), kind, model, args, inputs)
$function$;
GRANT EXECUTE ON FUNCTION pgml.request(kind text, model text, args jsonb, inputs jsonb) TO pgml_loopback;
GRANT EXECUTE ON FUNCTION pgml.request(kind text, model text, args jsonb, inputs jsonb) TO pgml_user;

-- FUNCTION pgml.retire_sealing_key(key_id text), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.retire_sealing_key(key_id text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._require_admin('retiring a sealing key');
    UPDATE pgml.sealing_keys k SET active = false, retired_at = coalesce(k.retired_at, pg_catalog.clock_timestamp())
    WHERE k.key_id = retire_sealing_key.key_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('no sealing key %L', retire_sealing_key.key_id),
            HINT = 'SELECT key_id, active, retired_at FROM pgml.sealing_keys lists them';
    END IF;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.retire_sealing_key(key_id text) TO pgml_admin;

-- FUNCTION pgml.revoke_credential(name text, role name), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.revoke_credential(name text, role name)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    PERFORM pgml._require_admin('revoking a credential');
    DELETE FROM pgml.credential_grants g WHERE g.credential = revoke_credential.name AND g.role = revoke_credential.role;
    RETURN FOUND;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.revoke_credential(name text, role name) TO pgml_admin;

-- FUNCTION pgml.transform(task jsonb, args jsonb, inputs jsonb[], cache_model boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb, inputs jsonb[], cache_model boolean DEFAULT false)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(task, args, pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.transform(task jsonb, args jsonb, inputs jsonb[], cache_model boolean) TO pgml_user;

-- FUNCTION pgml.transform(task jsonb, args jsonb, inputs text[], cache_model boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.transform(task jsonb, args jsonb DEFAULT '{}'::jsonb, inputs text[] DEFAULT ARRAY[]::text[], cache_model boolean DEFAULT false)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(task, args, pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.transform(task jsonb, args jsonb, inputs text[], cache_model boolean) TO pgml_user;

-- FUNCTION pgml.transform(task text, args jsonb, inputs text[], cache_model boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.transform(task text, args jsonb DEFAULT '{}'::jsonb, inputs text[] DEFAULT ARRAY[]::text[], cache_model boolean DEFAULT false)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_msg text; v_detail text; v_hint text; v_code text;
BEGIN
    RETURN pgml._transform(pg_catalog.jsonb_build_object('task', task) || coalesce(args -> 'task_args', '{}'),
                           args - 'task_args', pg_catalog.to_jsonb(inputs));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                            v_code = RETURNED_SQLSTATE;
    IF v_hint = '' AND v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, ERRCODE = v_code;
    ELSIF v_detail = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, HINT = v_hint, ERRCODE = v_code;
    ELSIF v_hint = '' THEN
        RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, ERRCODE = v_code;
    END IF;
    RAISE EXCEPTION USING MESSAGE = v_msg, DETAIL = v_detail, HINT = v_hint, ERRCODE = v_code;
END $function$;
GRANT EXECUTE ON FUNCTION pgml.transform(task text, args jsonb, inputs text[], cache_model boolean) TO pgml_user;

-- FUNCTION pgml.tune(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, wait boolean), owner pgml_owner
CREATE OR REPLACE FUNCTION pgml.tune(project_name text, task text DEFAULT NULL::text, relation_name text DEFAULT NULL::text, y_column_name text DEFAULT NULL::text, model_name text DEFAULT NULL::text, hyperparams jsonb DEFAULT '{}'::jsonb, test_size double precision DEFAULT 0.25, test_sampling text DEFAULT 'stratified'::text, automatic_deploy boolean DEFAULT true, materialize_snapshot boolean DEFAULT false, max_attempts integer DEFAULT 3, priority integer DEFAULT 0, caller_search_path text DEFAULT current_setting('search_path'::text), wait boolean DEFAULT false)
 RETURNS TABLE(job_id bigint, status text, project_id bigint, model_id bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
END $function$;
COMMENT ON FUNCTION pgml.tune(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, wait boolean) IS 'Queue a fine-tuning job (PostgresML API). Returns at once (a NOTICE names the job and how to follow it: CALL pgml.wait(job_id), SELECT * FROM pgml.jobs, the dashboard); a pgml-tuned worker trains it. With wait => true it waits for the job to end, printing its log rows as INFO lines, and returns its final status.';
GRANT EXECUTE ON FUNCTION pgml.tune(project_name text, task text, relation_name text, y_column_name text, model_name text, hyperparams jsonb, test_size double precision, test_sampling text, automatic_deploy boolean, materialize_snapshot boolean, max_attempts integer, priority integer, caller_search_path text, wait boolean) TO pgml_user;

-- PROCEDURE pgml.wait(IN job_id bigint, IN poll_seconds real, IN timeout_seconds real), owner pgml_owner
CREATE OR REPLACE PROCEDURE pgml.wait(IN job_id bigint, IN poll_seconds real DEFAULT 0.5, IN timeout_seconds real DEFAULT NULL::real)
 LANGUAGE plpgsql
AS $procedure$
DECLARE
    v_follow jsonb := '{"last_log": 0}';
    v_start timestamptz := pg_catalog.clock_timestamp();
BEGIN
    LOOP
        v_follow := pgml._job_follow(wait.job_id, (v_follow ->> 'last_log')::bigint, v_follow ->> 'advice');
        EXIT WHEN v_follow ->> 'status' IN ('succeeded', 'failed', 'cancelled');
        IF timeout_seconds IS NOT NULL
           AND pg_catalog.clock_timestamp() - v_start > pg_catalog.make_interval(secs => timeout_seconds) THEN
            RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s is still %s after %s s', wait.job_id,
                                                              v_follow ->> 'status', timeout_seconds),
                ERRCODE = 'query_canceled', HINT = 'CALL pgml.wait again to keep following it';
        END IF;
        COMMIT;
        PERFORM pg_catalog.pg_sleep(poll_seconds);
    END LOOP;
    IF v_follow ->> 'status' = 'failed' THEN
        RAISE EXCEPTION USING MESSAGE = pg_catalog.format('job %s failed: %s', wait.job_id, v_follow ->> 'error'),
            HINT = pg_catalog.format('SELECT errors FROM pgml.jobs WHERE id = %s shows every attempt', wait.job_id);
    END IF;
    RAISE INFO '%', pgml._job_end_line(wait.job_id, v_follow ->> 'status', v_follow -> 'metrics',
                                       v_follow ->> 'error');
END $procedure$;
GRANT EXECUTE ON PROCEDURE pgml.wait(IN job_id bigint, IN poll_seconds real, IN timeout_seconds real) TO pgml_user;


-- ==== event triggers ====

CREATE EVENT TRIGGER pgml_guard_schema ON ddl_command_end EXECUTE FUNCTION pgml._guard_schema();  -- enabled: O

-- ==== roles that include other roles ====

GRANT pgml_child TO pgml_worker;
GRANT pgml_serving TO pgml_worker;
GRANT pgml_user TO pgml_admin;

-- ==== grants on schemas, default privileges ====

GRANT CREATE, USAGE ON SCHEMA pgml TO pgml_user;
GRANT USAGE ON SCHEMA pgml TO pgml_child;
GRANT USAGE ON SCHEMA pgml TO pgml_loopback_<database>;
GRANT USAGE ON SCHEMA pgml TO pgml_serving;
GRANT USAGE ON SCHEMA pgml TO pgml_worker;
GRANT USAGE ON SCHEMA pgml_dblink TO pgml_owner;
GRANT USAGE ON SCHEMA pgml_rows TO pgml_admin;
GRANT USAGE ON SCHEMA pgml_rows TO pgml_user;
GRANT USAGE ON SCHEMA pgml_staging TO pgml_child;

-- ==== reference data (rows the migrations and functions write): count and md5 of the rows in key order ====

-- pgml.schema_migrations: 39 rows, md5 0bb59f618eaa125a3774b2cdbd791b5d
-- pgml.tasks: 9 rows, md5 69955b4b04e1105a5ce1f95e198eee7c
-- pgml.training_arg_types: 113 rows, md5 178ba75db15b9d624fbfd33fc4d75ce5
