-- Every statement the daemon and its training children run, as named blocks (`-- name: x`), loaded by
-- pgml_tuned/db.py and run through pgml_tuned/jobs.py. The job state machine is documented in pgml_tuned/states.py.
-- Writes by a worker are fenced: they match the job's current `attempt`, so a worker that lost its lease
-- can never overwrite the new owner's work.

-- name: claim_job
UPDATE pgml.jobs j
SET status = 'running',
    attempt = j.attempt + 1,
    worker = %(worker)s,
    lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    heartbeat_at = clock_timestamp(),
    started_at = coalesce(j.started_at, clock_timestamp()),
    updated_at = clock_timestamp(),
    error = NULL,
    child_ticket = NULL  -- the attempt's child gets a ticket of its own when it starts (set_child_ticket)
WHERE j.id = (
    SELECT q.id FROM pgml.jobs q
    WHERE q.status = 'queued' AND NOT q.cancel_requested
      -- only what this worker can run: hyperparams.resources.gpus (checked at submit, 0022_fleet) of its free GPUs
      AND coalesce((q.hyperparams -> 'resources' ->> 'gpus')::integer, 0) <= %(free_gpus)s
      -- a submitter at its max_running waits (a soft cap: two workers claiming at once may pass it by one)
      AND (q.max_running IS NULL
           OR (SELECT count(*) FROM pgml.jobs r WHERE r.status = 'running' AND r.submitted_by = q.submitted_by)
              < q.max_running)
    ORDER BY q.priority DESC, q.id
    FOR UPDATE SKIP LOCKED
    LIMIT 1
)
RETURNING j.id, j.attempt, j.project_id, j.model_id, j.task, j.relation_schema, j.relation_table,
          j.model_name, j.test_size, j.test_sampling, j.hyperparams, j.secrets, j.credential, j.submitted_by,
          j.snapshot_columns,
          extract(epoch FROM clock_timestamp() - j.created_at)::float8 AS queued_seconds,
          (SELECT name FROM pgml.projects p WHERE p.id = j.project_id) AS project_name,
          -- the hub allow-list may have changed since the job was submitted: checked again at every claim
          (SELECT h.error FROM pgml._hub_refusal(j.model_name, j.submitted_by, j.task) h) AS hub_refusal;

-- name: renew_leases
-- One statement renews every running attempt of a worker (parallel arrays of job ids and attempts); a job that
-- is missing from the result has lost its lease.
UPDATE pgml.jobs j
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    heartbeat_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS a (id, attempt)
WHERE j.id = a.id AND j.attempt = a.attempt AND j.status = 'running'
RETURNING j.id, j.cancel_requested,
          coalesce(clock_timestamp() - j.started_at > j.max_runtime, false) AS overtime;

-- name: reap_expired
-- A lease that ran out while the server itself was down is no sign of a dead worker: after a restart, every
-- worker gets one full lease (its lease_seconds) of server uptime to reconnect and renew before its job is reaped.
WITH expired AS (
    SELECT id FROM pgml.jobs
    WHERE status = 'running' AND lease_expires_at < clock_timestamp()
      AND pg_postmaster_start_time() + coalesce(lease_expires_at - heartbeat_at, interval '0') < clock_timestamp()
    FOR UPDATE SKIP LOCKED
)
UPDATE pgml.jobs j
SET failed_attempts = j.failed_attempts + 1,
    status = CASE WHEN j.cancel_requested THEN 'cancelled'
                  WHEN j.failed_attempts + 1 >= j.max_attempts THEN 'failed'
                  ELSE 'queued' END,
    errors = j.errors || jsonb_build_object(
        'attempt', j.attempt, 'worker', j.worker, 'at', clock_timestamp(),
        'error', format('worker %s stopped renewing its lease (killed, crashed or cut off); last heartbeat %s',
                        j.worker, j.heartbeat_at)),
    error = CASE WHEN j.failed_attempts + 1 >= j.max_attempts AND NOT j.cancel_requested THEN
        format('gave up after %s attempts: the worker of every attempt stopped renewing its lease '
               '(see errors); raise max_attempts to retry more', j.failed_attempts + 1) END,
    finished_at = CASE WHEN j.cancel_requested OR j.failed_attempts + 1 >= j.max_attempts
                       THEN clock_timestamp() END,
    lease_expires_at = NULL,
    worker = NULL,
    updated_at = clock_timestamp()
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.status, j.attempt;

-- name: fail_job
UPDATE pgml.jobs
SET status = 'failed',
    error = %(error)s,
    errors = errors || jsonb_build_object('attempt', attempt, 'worker', worker, 'error', %(error)s::text,
                                          'at', clock_timestamp()),
    finished_at = clock_timestamp(),
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: cancel_running
UPDATE pgml.jobs
SET status = 'cancelled',
    error = 'cancelled by ' || coalesce(%(by)s, 'request'),
    finished_at = clock_timestamp(),
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: requeue_job
UPDATE pgml.jobs
SET status = 'queued',
    worker = NULL,
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: job_credential
-- The name of the job's credential if its submitter may still use it (pgml.job_credential raises otherwise).
SELECT pgml.job_credential(%(id)s, %(attempt)s) AS credential;

-- name: job_status
SELECT status, attempt, error FROM pgml.jobs WHERE id = %(id)s;

-- name: queue_empty
-- What a draining worker still waits for: queued jobs it could run (with all its GPUs), and jobs held by a worker that stopped heartbeating (its lease
-- runs out, the poller reaps the job, and the drain takes it over) — a registered holder that is not live, or any
-- holder whose lease has already expired.
SELECT NOT EXISTS (SELECT 1 FROM pgml.jobs WHERE status = 'queued' AND NOT cancel_requested
                   AND coalesce((hyperparams -> 'resources' ->> 'gpus')::integer, 0) <= %(gpus)s)
   AND NOT EXISTS (
       SELECT 1 FROM pgml.jobs j
       WHERE j.status = 'running' AND j.worker IS DISTINCT FROM %(worker)s
         AND (j.lease_expires_at < clock_timestamp()
              OR EXISTS (SELECT 1 FROM pgml.worker_status w WHERE w.id = j.worker AND w.state <> 'live'))) AS empty;

-- name: worker_register
-- The fleet registry (0022_fleet): each daemon's own row, fenced on its token.
SELECT pgml._worker_register(%(worker)s::text, %(token)s::text, %(host)s::text, %(pid)s::integer, %(version)s::text,
                             %(devices)s::jsonb, %(gpus)s::integer, %(concurrency)s::integer,
                             %(heartbeat_seconds)s::real, %(lease_seconds)s::real);

-- name: worker_heartbeat
SELECT pgml._worker_heartbeat(%(worker)s::text, %(token)s::text, %(free_slots)s::integer, %(free_gpus)s::integer,
                              %(running)s::bigint[], %(models_cached)s::jsonb) AS owned;

-- name: worker_stop
SELECT pgml._worker_stop(%(worker)s::text, %(token)s::text) AS owned;

-- name: idle_workers
-- How many live workers have a free job slot (their last heartbeat's): the herd control's fleet size.
SELECT count(*) FILTER (WHERE w.free_slots > 0)::integer AS idle, count(*)::integer AS live
FROM pgml.worker_status w WHERE w.state = 'live';

-- name: registry_exists
SELECT pg_catalog.to_regprocedure('pgml._worker_heartbeat(text, text, integer, integer, bigint[], jsonb)') IS NOT NULL
    AS found;

-- name: jobs_by_status
SELECT status, jobs FROM pgml.queue_summary;

-- name: release_orphans
-- After a claim whose reply was lost: jobs this worker claimed but does not run go back to the queue.
UPDATE pgml.jobs
SET status = 'queued', worker = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE worker = %(worker)s AND status = 'running' AND NOT (id = ANY (%(running)s::bigint[]))
RETURNING id;

-- name: set_child_ticket
-- When the attempt's child starts: the sha256 of its ticket (the child gets the ticket itself on stdin).
UPDATE pgml.jobs SET child_ticket = %(hash)s
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: child_log
-- The child's statements (from here on): each a pgml._child_* function (migration 0010), refused unless the ticket
-- is the running attempt's; the file COPYs are checked row by row against the ticket the transaction began with.
-- %(logs)s is a JSON array of {"seq": n, "kind": "train"|"info"|"warning", "entry": {...}}: a batch retried after a
-- lost reply inserts nothing twice.
SELECT pgml._child_log(%(id)s, %(ticket)s, %(progress)s::jsonb, %(logs)s::jsonb) AS inserted;

-- name: child_resume
-- This attempt trains on from %(step)s: earlier attempts' training rows past it move to pgml.superseded_logs, and
-- %(entry)s becomes this attempt's info row %(seq)s, in one statement (0018_log_kinds.sql).
SELECT pgml._child_resume(%(id)s, %(ticket)s, %(step)s, %(seq)s, %(entry)s::jsonb) AS moved;

-- name: child_files_begin
-- The final transaction: locks the running attempt's job, drops its model's files of an earlier try.
SELECT pgml._child_files_begin(%(id)s, %(ticket)s) AS model_id;

-- name: copy_files
COPY pgml.file_parts (model_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: child_succeed
SELECT pgml._child_succeed(%(id)s, %(ticket)s, %(metrics)s::jsonb, %(base_model)s) AS model_id;

-- name: child_checkpoint_begin
-- A checkpoint's transaction: locks the job, replaces a re-run step's checkpoint, returns the new one's id.
SELECT pgml._child_checkpoint_begin(%(id)s, %(ticket)s, %(step)s) AS id;

-- name: hub_refusal
-- Why the hub allow-list (pgml.hub_allowlist) refuses a model for the job's submitter; no row when it does not.
SELECT error FROM pgml._hub_refusal(%(model_name)s::text, %(owner)s::name);

-- name: copy_checkpoint_files
COPY pgml.checkpoint_files (checkpoint_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: child_checkpoint_end
-- Counts the checkpoint's files, keeps the newest %(keep)s; what the job's checkpoints hold now against its limit.
SELECT bytes, max_bytes FROM pgml._child_checkpoint_end(%(id)s, %(ticket)s, %(checkpoint_id)s, %(keep)s);

-- name: child_rows
-- The rows pgml.tune() copied at submit time, in their order (jobs.snapshot_columns names their columns).
SELECT v FROM pgml._child_rows(%(id)s, %(ticket)s) AS v;

-- name: model_files
SELECT path, part, data FROM pgml.files WHERE model_id = %(model_id)s ORDER BY path, part;

-- name: child_model_files
SELECT path, part, data FROM pgml._child_model_files(%(id)s, %(ticket)s, %(model_id)s);

-- name: child_find_model
-- pgml:<project> → the submitter's project's latest successful model; pgml:model:<id> → that model. Only models
-- the job's submitter may read (its own, or any for an administrator): another user's is "no such model".
SELECT id, status, base_model, task, project_name FROM pgml._child_find_model(%(id)s, %(ticket)s, %(model_id)s, %(project)s);

-- name: child_latest_checkpoint
SELECT id, step, attempt, bytes FROM pgml._child_latest_checkpoint(%(id)s, %(ticket)s);

-- name: child_checkpoint_files
SELECT path, part, data FROM pgml._child_checkpoint_files(%(id)s, %(ticket)s, %(checkpoint_id)s);

-- name: dataset_begin
-- A load_dataset child's staging table for its attempt (created, owned and checked by the definer, which checks
-- the child's ticket and locks the job).
SELECT pgml._dataset_begin(%(id)s, %(ticket)s, %(names)s::text[], %(types)s::text[]) AS staging;

-- name: dataset_commit
-- Inside the child's final transaction: the staging table becomes pgml."<source>" (then child_succeed).
SELECT pgml._dataset_commit(%(id)s, %(ticket)s, %(rows)s) AS result;

-- name: claim_requests
-- The inference lane (the serving process; the functions of 0014_serving.sql).
SELECT * FROM pgml._requests_claim(%(serving_id)s, %(max_n)s, %(lease_seconds)s);

-- name: renew_requests
SELECT id FROM pgml._requests_renew(%(serving_id)s, %(lease_seconds)s) AS r (id);

-- name: finish_request
-- An answer (result, usage) or an error (error not NULL).
SELECT pgml._request_finish(%(id)s, %(serving_id)s, %(result)s::jsonb, %(usage)s::jsonb, %(error)s) AS owned;

-- name: answer_requests
-- A whole batch's answers in one statement (ids[i] gets results[i]); the ids still owned come back.
SELECT id FROM pgml._requests_answer(%(serving_id)s, %(ids)s::bigint[], %(results)s::jsonb[]) AS a (id);

-- name: unlock_requests
-- The lane's advisory locks on these requests (taken by claim_requests), once their answers are committed.
SELECT pg_catalog.pg_advisory_unlock(pgml._request_lock_space(), pgml._request_lock_key(i))
FROM pg_catalog.unnest(%(ids)s::bigint[]) AS i;

-- name: request_chunk
SELECT pgml._request_chunk(%(id)s, %(serving_id)s, %(first_seq)s, %(texts)s::text[]) AS owned;

-- name: release_requests
-- A dead serving process's requests (serving_id), or every request whose lease ran out (serving_id NULL).
SELECT id, status FROM pgml._requests_release(%(serving_id)s::text);

-- name: requests_housekeeping
-- One round trip per poll: requests whose lease ran out (any serving process's), and what nobody will read again.
WITH released AS (SELECT id, status FROM pgml._requests_release(NULL))
SELECT (SELECT pgml._requests_expire()) AS deleted,
       (SELECT coalesce(pg_catalog.jsonb_agg(released), '[]') FROM released) AS released;

-- name: serving_model
-- The stored model a request's pgml:<ref> names for its submitter (0014: only models it may read).
SELECT id, status, base_model, task, project_name FROM pgml._serving_model(%(owner)s, %(ref)s) LIMIT 1;

-- name: serving_model_files
SELECT path, part, data FROM pgml._serving_model_files(%(model_id)s);

-- name: child_predictions_begin
-- A predict_batch child's transaction: (re)creates its output table (emptied when restart), lets its COPY in.
SELECT pgml._child_predictions_begin(%(id)s, %(ticket)s, %(restart)s) AS output;
