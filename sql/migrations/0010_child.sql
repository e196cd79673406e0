-- 0010_child: the training child's own, narrow database access, scoped to its attempt. Plain SQL, idempotent,
-- runnable with psql by an administrator.
--
-- A child runs a user's model code. Until now it connected as the worker, so a malicious model could do anything a
-- worker may: read every job's rows, write other jobs' logs, overwrite other models' files, "succeed" other jobs.
-- Now:
--   pgml_child   (NOLOGIN; granted to the children's login: GRANT pgml_child TO worker_child;) may execute the
--                pgml._child_* functions below and nothing else, plus INSERT into the two file tables, where a
--                trigger lets through only the parts of its own job.
--   a ticket     per attempt: the worker draws a random one when it starts the child, stores only its sha256 on the
--                job row (jobs.child_ticket, cleared by every claim) and hands the ticket to the child on stdin.
--                Every child function takes (job_id, ticket) and refuses (SQLSTATE PGT01) unless the job is running
--                and that ticket is its running attempt's: another job, a stale attempt, an ended job are refused.
-- The bulk paths stay COPY: reads are COPY (SELECT * FROM pgml._child_…(job, ticket)) TO STDOUT; writes COPY straight
-- into pgml.file_parts / pgml.checkpoint_files (COPY FROM cannot write into a table with row-level security), where a
-- BEFORE INSERT trigger checks each row (a part: up to 8 MB) against the ticket the transaction's _child_*_begin()
-- call verified. Nothing of a child's session is ever read by a definer function (no temp table, no user type).
--
-- pgml_worker is a member of pgml_child, so a worker without a child login of its own (child_dsn not set) still
-- runs its children through the same functions; a deployment gives the children a login of their own.

DO $$
BEGIN
    CREATE ROLE pgml_child NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database of this cluster (or a concurrent migration) created it
END $$;

-- the sha256 of the running attempt's child ticket (never the ticket itself)
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS child_ticket bytea;

-- noop (a diagnostic task for administrators) reports who its child runs as and whether it can read the files
-- named in hyperparams.probe (never their contents): the way to check a worker's sandbox, e.g. its key file
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['probe'] WHERE name = 'noop' AND NOT 'probe' = ANY (hyperparams);

INSERT INTO pgml.schema_migrations (version) VALUES ('0010_child') ON CONFLICT DO NOTHING;
