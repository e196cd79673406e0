-- The statements of the `pgml-tuned` command line (daemon/pgml_tuned/cli/), as named blocks (`-- name: x`)
-- loaded with pgml_tuned.db.q(name, file="cli.sql"). They run on the login the command was given (a user's,
-- or an administrator's for keys and gc), so row-level security and the views' filters decide what it sees.

-- name: schema_installed
-- One row when the database holds the pgml schema (its migrations table), none before `pgml-tuned migrate`.
SELECT 1
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgml' AND c.relname = 'schema_migrations';

-- name: activate_sealing_key
-- keys activate KEY_ID: inline tokens are sealed to this registered key from now on.
SELECT pgml.activate_sealing_key(%(key_id)s);

-- name: retire_sealing_key
-- keys retire KEY_ID: the key never seals again (jobs already sealed with it still run on workers that hold it).
SELECT pgml.retire_sealing_key(%(key_id)s);

-- name: sealing_keys
-- keys list: every registered sealing key, oldest first, with how many unfinished jobs it sealed.
SELECT key_id, active, created_at, retired_at, pending_jobs
FROM pgml.sealing_key_use
ORDER BY created_at;

-- name: job_progress
-- What `wait` and `logs --follow` show of one job: its progress, and the latest log row with eval metrics.
SELECT s.id, s.task, s.status, s.step, s.max_steps, s.progress_pct, s.last_loss, s.eta, s.error, s.metrics,
       s.model_id,
       (SELECT l.logs
        FROM pgml.logs l
        WHERE l.job_id = s.id AND l.logs ? 'eval_loss'
        ORDER BY l.id DESC
        LIMIT 1) AS last_eval
FROM pgml.job_status s
WHERE s.id = %(job_id)s;

-- name: job_status
-- status JOB: the job's whole row of pgml.job_status.
SELECT * FROM pgml.job_status WHERE id = %(job_id)s;

-- name: queue_summary
-- status: how many jobs are in each state, expired leases and the oldest queued job's age.
SELECT * FROM pgml.queue_summary;

-- name: recent_jobs
-- status: the jobs queued or running, and those that finished in the last hour, newest first.
SELECT id, project, task, status, attempt, worker, step, max_steps, progress_pct, last_loss, eta, heartbeat_age,
       metrics, model_id, error
FROM pgml.job_status
WHERE status IN ('queued', 'running') OR finished_at > now() - interval '1 hour'
ORDER BY id DESC
LIMIT %(limit)s;

-- name: has_worker_status
-- v is NULL on a schema without the fleet registry (before 0022_fleet).
SELECT pg_catalog.to_regclass('pgml.worker_status') AS v;

-- name: workers
-- status: the fleet registry, live workers first.
SELECT id, host, state, heartbeat_age, gpus, devices, concurrency, free_slots, free_gpus, running, models_cached,
       version, started_at
FROM pgml.worker_status
ORDER BY array_position(ARRAY['live', 'late', 'gone', 'stopped'], state), id;

-- name: job_state
-- logs JOB: whether the job has ended, and why it failed.
SELECT status, error FROM pgml.jobs WHERE id = %(job_id)s;

-- name: job_logs_after
-- logs JOB: the job's log rows after the last one printed, in order.
SELECT id, kind, logs
FROM pgml.logs
WHERE job_id = %(job_id)s AND id > %(after)s
ORDER BY id;

-- name: cancel_job
-- cancel JOB: cancel a queued or running job (pgml.cancel); answers what became of it.
SELECT pgml.cancel(%(job_id)s) AS status;

-- name: model_latest_job
-- download: the model and its latest job, to say why it has no files to download.
SELECT m.id AS model_id, j.id, j.status, j.error
FROM pgml.models m
LEFT JOIN LATERAL (SELECT id, status, error FROM pgml.jobs WHERE model_id = m.id ORDER BY id DESC LIMIT 1) j ON true
WHERE m.id = %(model_id)s;

-- name: gc
-- gc: what old jobs hold (pgml.gc, an administrator's function); with apply => true it is freed.
SELECT *
FROM pgml.gc(keep_last => %(keep_last)s, logs_older_than => %(logs_older_than)s::interval,
             include_kept => %(include_kept)s, apply => %(apply)s);

-- name: import_model_begin
-- models import: the checked request (sql/functions/76_imports.sql); the model's files follow with COPY
-- (copy_files, sql/queries.sql) in the same transaction.
SELECT pgml.import_model_begin(%(project)s, %(task)s, %(base)s, %(files)s, %(source)s, %(owner)s) AS model_id;

-- name: import_model_finish
-- models import: the stored files checked, the model successful and deployed; what to use.
SELECT * FROM pgml.import_model_finish(%(model_id)s);
