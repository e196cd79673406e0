-- Every grant on pgml-tuned's functions, tables, views and sequences, in one place: what each role may call and
-- read. Applied last by every `pgml-tuned migrate`: first everything is revoked from the roles below (and PUBLIC),
-- then granted again from this file, so a line removed here is a right removed from every database on its next
-- migrate. Row-level security (the policies, sql/migrations) narrows what a role may read to its own rows.
--
-- pgml_user: the SQL API (submit, wait, read its own jobs, models and logs); pgml_admin: a pgml_user who also sees
-- and manages everyone's; pgml_worker: the daemons' login; pgml_child: a job's training process (ticketed
-- functions only); pgml_loopback: the group of every database's loopback login (synchronous calls).

-- first, everything the migrating role created in schema pgml goes to pgml_owner (10_security.sql)
SELECT pgml._own_everything();

REVOKE ALL ON ALL ROUTINES IN SCHEMA pgml FROM PUBLIC, pgml_user, pgml_worker, pgml_admin, pgml_child, pgml_loopback,
    pgml_serving;
ALTER DEFAULT PRIVILEGES FOR ROLE pgml_owner IN SCHEMA pgml REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
REVOKE ALL ON
    pgml.checkpoint_files, pgml.checkpoints, pgml.checkpoints_id_seq, pgml.credential_grants,
    pgml.credentials, pgml.datasets, pgml.deployments, pgml.deployments_id_seq,
    pgml.file_parts, pgml.files, pgml.files_id_seq, pgml.gang_members, pgml.gang_secrets,
    pgml.hub_allowlist, pgml.job_events, pgml.job_events_id_seq, pgml.job_rows,
    pgml.job_status, pgml.jobs, pgml.jobs_id_seq, pgml.logs,
    pgml.logs_id_seq, pgml.loopback_login, pgml.models, pgml.models_id_seq,
    pgml.output_tables, pgml.projects, pgml.projects_id_seq, pgml.queue_summary,
    pgml.request_chunks, pgml.requests, pgml.requests_id_seq, pgml.role_limits,
    pgml.schema_migrations, pgml.sealing_key_use, pgml.sealing_keys, pgml.superseded_logs,
    pgml.tasks, pgml.training_arg_types, pgml.tune_requests, pgml.worker_status,
    pgml.workers
    FROM PUBLIC, pgml_user, pgml_worker, pgml_admin, pgml_child, pgml_loopback, pgml_serving;
-- which roles include which: an administrator is also a user; a worker may act for its children (when they have
-- no login of their own, PGML_CHILD_DSN unset). The roles themselves are created by sql/migrations (0008, 0010, 0013).
GRANT pgml_user TO pgml_admin;
GRANT pgml_child TO pgml_worker;
GRANT pgml_serving TO pgml_worker;  -- its serving process without a login of its own (PGML_SERVING_DSN unset)

GRANT USAGE ON SCHEMA pgml TO pgml_user, pgml_worker, pgml_child, pgml_serving;
-- dblink's own schema (sql/migrations/0013): only pgml_owner may use it (pgml._setup_loopback grants that)
DO $$
BEGIN
    IF pg_catalog.to_regnamespace('pgml_dblink') IS NOT NULL THEN
        REVOKE ALL ON SCHEMA pgml_dblink FROM PUBLIC;
    END IF;
END $$;
GRANT USAGE ON SCHEMA pgml_rows TO pgml_user, pgml_admin;
-- load_dataset's staging tables (0034): a child COPYs into its own (granted INSERT on it alone); nobody else
REVOKE ALL ON SCHEMA pgml_staging FROM PUBLIC, pgml_user, pgml_worker, pgml_admin, pgml_child, pgml_loopback, pgml_serving;
GRANT USAGE ON SCHEMA pgml_staging TO pgml_child;

-- ---- pgml_user ----
GRANT INSERT, SELECT ON pgml.tune_requests TO pgml_user;
-- (pgml.job_rows: read only. pgml.tune copies rows into a job table of its own since 0024; an INSERT there, in a
-- submission of one's own, was a way around the size limit, which checks the job's table)
GRANT SELECT ON pgml.checkpoints, pgml.credential_grants, pgml.credentials, pgml.datasets, pgml.deployments,
    pgml.files, pgml.hub_allowlist, pgml.job_events, pgml.job_rows, pgml.job_status, pgml.jobs, pgml.logs, pgml.models,
    pgml.output_tables, pgml.projects, pgml.queue_summary, pgml.role_limits, pgml.superseded_logs, pgml.tasks,
    pgml.training_arg_types, pgml.worker_status TO pgml_user;
-- the files of an import begun in the same transaction (pgml.import_model_begin): the insert trigger lets nothing
-- else through (pgml._child_insert_check); pgml.files, the view, stays read-only
GRANT INSERT ON pgml.file_parts TO pgml_user;
GRANT USAGE ON SEQUENCE pgml.files_id_seq TO pgml_user;
-- Internal functions (pgml._*) are not pgml_user's to call; the API functions call them as pgml_owner (SECURITY
-- DEFINER). Those left, and why each must stay callable (tests/security/test_privileges.py lists every decision):
GRANT EXECUTE ON ROUTINE
    -- pgml.tune runs as its caller (it reads the caller's relation with the caller's rights): the two definer
    -- steps around its INSERT ... SELECT. Safe on their own: the queue limit counts 'submitting' jobs, and no job
    -- is committed while 'submitting', so none without _submitted's size check (50_submit.sql)
    pgml._submit(text,text,text,text,text,jsonb,double precision,text,boolean,boolean,integer,integer,text,oid,text),
    pgml._submitted(bigint,bigint),
    -- pgml.wait is a procedure that COMMITs between polls, so it cannot be SECURITY DEFINER; answers only for a
    -- job the caller may see
    pgml._wait_advice(bigint),
    -- what pgml.wait and pgml.tune (as their caller) follow a job and print with: pure formatting, and one poll that
    -- reads as the caller (row-level security)
    pgml._job_end_line(bigint,text,jsonb,text),
    pgml._job_follow(bigint,bigint,text),
    pgml._job_queued_notice(bigint,boolean),
    pgml._log_line(jsonb,text),
    pgml._log_pairs(jsonb,text[],text[],text),
    pgml._log_value(text,jsonb),
    -- pgml.tune(..., wait => true)'s steps through the loopback; each does only what the caller may do itself, as
    -- the caller (50_submit.sql)
    pgml._tune_loopback(text,bigint,jsonb),
    -- the documented way to read a load_dataset_async job's result; runs as its caller (row-level security)
    pgml._dataset_result(bigint),
    -- the list of kwargs load_dataset passes on (a constant: documentation for its callers)
    pgml._dataset_kwargs(),
    -- pgml.embed_batch runs as its caller (pgml.tune reads the caller's relation): its kwargs' checks (reads nothing)
    pgml._retrieval_call(text,text,jsonb),
    -- and how it reads a bare project name (as its caller: row-level security shows only the caller's projects)
    pgml._own_project_ref(text,name),
    -- the answer, stream and abandon calls of an asynchronous pgml.request (the Python client, sql/client.sql);
    -- each answers only the request's submitter
    pgml._request_abandon(bigint),
    pgml._request_answer(bigint),
    pgml._request_chunks(bigint,integer),
    pgml.cancel(bigint),
    pgml.check_hub_model(text),
    pgml.deploy(text,bigint),
    pgml.deploy(text,text),
    pgml.deployed_model(bigint),
    pgml.hub_model_allowed(text),
    -- bring your own model (76_imports.sql): begin checks the request, finish the stored files; a user imports
    -- into its own projects only (an administrator into another login's)
    pgml.import_model_begin(text,text,text,jsonb,text,name),
    pgml.import_model_finish(bigint),
    pgml.load_dataset(text,text,integer,jsonb),
    pgml.load_dataset_async(text,text,integer,jsonb),
    pgml.embed(text,text,jsonb),
    pgml.embed(text,text[],jsonb),
    pgml.embed_batch(text,text,text,text,text,jsonb,integer,integer,text),
    pgml.predict_batch(text,text,text,text,text,integer,integer,integer,text),
    pgml.rank(text,text,text[],jsonb),
    pgml.request(text,text,jsonb,jsonb),
    pgml.transform(jsonb,jsonb,jsonb[],boolean),
    pgml.transform(jsonb,jsonb,text[],boolean),
    pgml.transform(text,jsonb,text[],boolean),
    pgml.tune(text,text,text,text,text,jsonb,double precision,text,boolean,boolean,integer,integer,text,boolean),
    pgml.wait(bigint,real,real)
TO pgml_user;

-- ---- pgml_worker ----
-- (the inference lane's functions it holds as a member of pgml_serving, below, and the children's as a member of
-- pgml_child)
GRANT DELETE, INSERT, SELECT, UPDATE ON pgml.gang_members TO pgml_worker;
GRANT DELETE, INSERT, SELECT, UPDATE ON pgml.gang_secrets TO pgml_worker;  -- the workers' alone (0034)
GRANT SELECT ON pgml.deployments, pgml.hub_allowlist, pgml.job_events, pgml.job_status, pgml.logs, pgml.models,
    pgml.projects, pgml.queue_summary, pgml.superseded_logs, pgml.tasks, pgml.worker_status TO pgml_worker;
GRANT SELECT, UPDATE ON pgml.jobs TO pgml_worker;
GRANT USAGE ON SEQUENCE pgml.checkpoints_id_seq, pgml.files_id_seq, pgml.job_events_id_seq, pgml.jobs_id_seq,
    pgml.logs_id_seq, pgml.models_id_seq, pgml.projects_id_seq TO pgml_worker;
GRANT EXECUTE ON ROUTINE
    pgml._async_commit(),
    pgml._job_resources(jsonb),
    pgml._job_tables_sweep(),
    pgml._model_ref(bigint,text,name),
    pgml._wait_advice(bigint),
    pgml._worker_heartbeat(text,text,integer,integer,bigint[],jsonb,jsonb),
    pgml._worker_register(text,text,text,integer,text,jsonb,integer,integer,real,real,integer),
    pgml._worker_stop(text,text),
    pgml.check_hub_model(text),
    pgml.deployed_model(bigint),
    pgml.hub_model_allowed(text),
    pgml.job_credential(bigint,integer)
TO pgml_worker;

-- ---- pgml_admin ----
GRANT DELETE, INSERT, UPDATE ON pgml.role_limits TO pgml_admin;
GRANT SELECT ON pgml.gang_members, pgml.sealing_key_use, pgml.sealing_keys, pgml.worker_status TO pgml_admin;
GRANT EXECUTE ON ROUTINE
    pgml._request_abandon(bigint),
    pgml._request_answer(bigint),
    pgml._request_chunks(bigint,integer),
    pgml._request_submit(name,text,text,jsonb,jsonb),
    pgml._stale_loopback_logins(boolean),
    pgml.activate_sealing_key(text),
    pgml.allow_credential(text,name),
    pgml.drop_credential(text),
    pgml.gc(integer,interval,boolean,boolean),
    pgml.hub_allow(text,text),
    pgml.hub_disallow(text),
    pgml.register_sealing_key(numeric,numeric,boolean),
    pgml.retire_sealing_key(text),
    pgml.revoke_credential(text,name)
TO pgml_admin;

-- ---- pgml_child ----
GRANT INSERT ON pgml.checkpoint_files, pgml.file_parts TO pgml_child;
GRANT USAGE ON SEQUENCE pgml.files_id_seq TO pgml_child;
GRANT EXECUTE ON ROUTINE
    pgml._child_checkpoint_begin(bigint,text,bigint),
    pgml._child_checkpoint_end(bigint,text,bigint,integer),
    pgml._child_checkpoint_files(bigint,text,bigint),
    pgml._child_files_begin(bigint,text),
    pgml._child_find_model(bigint,text,bigint,text),
    pgml._child_latest_checkpoint(bigint,text),
    pgml._child_log(bigint,text,jsonb,jsonb),
    pgml._child_model_files(bigint,text,bigint),
    pgml._child_predictions_begin(bigint,text,boolean),
    pgml._child_resume(bigint,text,bigint,integer,jsonb),
    pgml._child_rows(bigint,text),
    pgml._child_succeed(bigint,text,jsonb,text),
    pgml._dataset_begin(bigint,text,text[],text[]),
    pgml._dataset_commit(bigint,text,bigint),
    pgml._dataset_kwargs(),
    pgml._hub_refusal(text,name,text)
TO pgml_child;

-- ---- pgml_serving ----
-- the serving process (0035): the inference lane's functions (sql/queries.sql, the statements of serving/), no table
GRANT EXECUTE ON ROUTINE
    pgml._hub_refusal(text,name,text),
    pgml._request_chunk(bigint,text,integer,text[]),
    pgml._request_finish(bigint,text,jsonb,jsonb,text),
    pgml._request_lock_key(bigint),
    pgml._request_lock_space(),
    pgml._requests_answer(text,bigint[],jsonb[],integer[],integer,real[]),
    pgml._requests_claim(text,integer,double precision,integer),
    pgml._requests_expire(),
    pgml._requests_release(text),
    pgml._requests_renew(text,double precision),
    pgml._serving_model(name,text),
    pgml._serving_model_files(bigint)
TO pgml_serving;

-- ---- pgml_loopback ----
GRANT EXECUTE ON ROUTINE
    -- pgml.tune(..., wait => true)'s submission (pgml._tune_loopback), for the user the loopback acts for
    pgml._job_rows_put(bigint,jsonb),
    pgml._submit(text,text,text,text,text,jsonb,double precision,text,boolean,boolean,integer,integer,text,oid,text),
    pgml._submitted(bigint,bigint),
    pgml._request_abandon(bigint),
    pgml._request_answer(bigint),
    pgml.cancel(bigint),
    pgml.load_dataset_async(text,text,integer,jsonb),
    pgml.request(text,text,jsonb,jsonb)
TO pgml_loopback;
