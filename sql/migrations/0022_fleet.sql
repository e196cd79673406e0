-- 0022_fleet: the fleet. Every daemon registers itself in pgml.workers (devices, slots, the models its serving
-- process keeps warm), renews its row from its heartbeat loop and marks it stopped on a clean exit;
-- pgml.worker_status computes live / late / gone / stopped from the heartbeat's age. Jobs may ask for devices
-- (hyperparams.resources: {"gpus": N, "procs": N, "nodes": N}); a worker claims only what it can run, pgml.tune
-- says at submit time when no live worker could, and CALL pgml.wait says why a job does not move
-- (pgml._wait_advice). Writes go through the SECURITY DEFINER functions below, granted to pgml_worker; each
-- daemon's row is fenced on a random token only that daemon holds (its sha256 is stored).

CREATE TABLE IF NOT EXISTS pgml.workers (
    id                text PRIMARY KEY,
    login             name NOT NULL,                -- the database login that registered it
    token_hash        bytea NOT NULL,               -- sha256 of the daemon's registry token
    host              text NOT NULL,
    pid               integer,
    version           text NOT NULL,
    devices           jsonb NOT NULL DEFAULT '[]',  -- [{"index": "0", "name": "NVIDIA H100", "memory_mb": 81559}]
    gpus              integer NOT NULL DEFAULT 0,
    concurrency       integer NOT NULL,
    free_slots        integer NOT NULL,
    free_gpus         integer NOT NULL DEFAULT 0,
    running           bigint[] NOT NULL DEFAULT '{}',
    models_cached     jsonb NOT NULL DEFAULT '[]',  -- what its serving process keeps warm
    heartbeat_seconds real NOT NULL,
    lease_seconds     real NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    heartbeat_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    stopped_at        timestamptz
);

-- Jobs of every training task may ask for resources (pgml_tuned/tasks.py agrees).
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources']
WHERE name IN ('text-classification', 'text-pair-classification', 'conversation', 'noop', 'predict_batch')
  AND NOT 'resources' = ANY (hyperparams);

INSERT INTO pgml.schema_migrations (version) VALUES ('0022_fleet') ON CONFLICT DO NOTHING;
