-- 0027_gangs: jobs across several hosts. hyperparams.resources.nodes = N (N > 1) runs the job's ranks on N workers
-- at once, a gang (pgml_tuned/worker/gang.py tells the whole story):
--   * the first worker to claim the job (claim_job, as any job) is its leader, node 0: it records the rendezvous
--     address of the attempt (host:port, where its rank 0 hosts torch.distributed's store) in jobs.rendezvous and
--     opens the gang: jobs.gang_needed = N - 1, and a NOTIFY on pgml_jobs {"type": "gang_forming"} (a hint only).
--   * idle workers join it (gang_join in queries.sql: one statement takes the next node number, FOR UPDATE SKIP
--     LOCKED): a row of pgml.gang_members each, with the sha256 of its own child ticket.
--   * once gang_needed is 0 every member starts its ranks; the leader's rank 0 alone writes the job's logs,
--     checkpoints, files and final commit (its job ticket, as for one host). A member's ticket only reads: the
--     job's rows, the models its submitter may start from, its stored checkpoints (pgml._child_reader below).
--   * a gang that does not form within the leader's gang_seconds is given back untouched (queued again; nothing
--     counted against max_attempts), or failed when fewer live workers are registered than it needs.
--   * each member reports how its ranks ended on its row; the leader settles the job for the whole gang.
-- Plain SQL, idempotent, runnable with psql by an administrator.

ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS rendezvous text;               -- the leader's host:port, per attempt
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS gang_needed integer NOT NULL DEFAULT 0;  -- members still to join
-- what a worker looks for when it joins gangs: a handful of rows at most
CREATE INDEX IF NOT EXISTS jobs_gang_forming ON pgml.jobs (priority DESC, id) WHERE gang_needed > 0 AND status = 'running';

CREATE TABLE IF NOT EXISTS pgml.gang_members (
    job_id       bigint NOT NULL REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    node         integer NOT NULL CHECK (node >= 1),          -- the leader (node 0) is jobs.worker
    worker       text NOT NULL,
    child_ticket bytea,                                       -- sha256 of the member's child ticket
    joined_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    outcome      text CHECK (outcome IN ('ok', 'error', 'stopped')),  -- NULL while its ranks run
    error        text,
    error_at     double precision,                            -- epoch seconds its launcher saw the first error
    PRIMARY KEY (job_id, attempt, node),
    UNIQUE (job_id, attempt, worker)
);

-- every caller of the 1-argument form (0022) is replaced above
DROP FUNCTION IF EXISTS pgml._fleet_shortfall(integer);

INSERT INTO pgml.schema_migrations (version) VALUES ('0027_gangs') ON CONFLICT DO NOTHING;
