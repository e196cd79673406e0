-- 0033_fair_lanes: the shared lanes are fair and bounded (issue 20, class 4).
--
-- * The inference lane claims round-robin across submitters, weighted by texts (70_requests.sql's
--   pgml._requests_claim): a request's place is its submitter's queued texts up to and including it, so one user's
--   40 requests of 1000 texts no longer go before everyone else's. requests.n_inputs (texts, or 1 for a
--   conversation) is what it weighs; one index finds each submitter's pending requests in order.
-- * Per-role caps on what one login may have pending in the lane (requests, texts), and on what one job may ask of
--   the fleet (hyperparams.resources: GPUs, CPU processes, workers at once), in pgml.role_limits as the job limits
--   of 0008 (a login's own row, else pgml_user's; NULL = no limit). Refused at submit past them.
-- * Workers register how many CPUs they have (pgml.workers.cpus): resources.procs is bounded by the largest live one.

ALTER TABLE pgml.role_limits ADD COLUMN IF NOT EXISTS max_gpus integer;              -- resources.gpus of one job
ALTER TABLE pgml.role_limits ADD COLUMN IF NOT EXISTS max_procs integer;             -- resources.procs of one job
ALTER TABLE pgml.role_limits ADD COLUMN IF NOT EXISTS max_nodes integer;             -- resources.nodes of one job
ALTER TABLE pgml.role_limits ADD COLUMN IF NOT EXISTS max_pending_requests integer;  -- queued or running requests
ALTER TABLE pgml.role_limits ADD COLUMN IF NOT EXISTS max_pending_inputs integer;    -- their texts, all together
UPDATE pgml.role_limits
SET max_gpus = 8, max_procs = 8, max_nodes = 4, max_pending_requests = 100, max_pending_inputs = 10000
WHERE role = 'pgml_user';

ALTER TABLE pgml.requests ADD COLUMN IF NOT EXISTS n_inputs integer NOT NULL DEFAULT 1;
UPDATE pgml.requests SET n_inputs = pg_catalog.jsonb_array_length(inputs)
WHERE kind <> 'chat' AND pg_catalog.jsonb_typeof(inputs) = 'array';
-- a submitter's pending requests in order: the fair claim walks it per submitter, the caps count it
CREATE INDEX IF NOT EXISTS requests_pending_idx ON pgml.requests (submitted_by, id) INCLUDE (n_inputs)
    WHERE status IN ('queued', 'running');

ALTER TABLE pgml.workers ADD COLUMN IF NOT EXISTS cpus integer;  -- NULL: a daemon older than 0033 (not known)

-- new signatures (70_requests.sql, 80_fleet.sql define them): the old ones go, so that no call is ambiguous
DROP FUNCTION IF EXISTS pgml._requests_claim(text, integer, double precision);
DROP FUNCTION IF EXISTS pgml._worker_register(text, text, text, integer, text, jsonb, integer, integer, real, real);

INSERT INTO pgml.schema_migrations (version) VALUES ('0033_fair_lanes') ON CONFLICT DO NOTHING;
