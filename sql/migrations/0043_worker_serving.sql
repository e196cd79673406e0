-- 0043_worker_serving: pgml.worker_status shows what each worker's serving process loaded and evicted (issue 22).
--
-- * pgml.workers.serving (jsonb): the bases and adapters loaded now, the adapters' MB, and since the daemon started
--   the loads, their seconds (a sum), the evictions and when the last of each happened, by kind (base, adapter):
--   counted by the daemon from the same load lines as its /metrics. pgml.worker_status shows it to administrators
--   and workers (as models_cached).
-- * pgml._worker_heartbeat has a last parameter `serving jsonb DEFAULT '{}'`: a new signature, so the old one is
--   dropped here (its body and grants are in sql/functions: 80_fleet.sql, 90_grants.sql). A daemon of the previous
--   version, calling it with six arguments, still beats.

DROP FUNCTION IF EXISTS pgml._worker_heartbeat(text, text, integer, integer, bigint[], jsonb);

ALTER TABLE pgml.workers
    ADD COLUMN IF NOT EXISTS serving jsonb NOT NULL DEFAULT '{}';  -- its serving process's loads and evictions

INSERT INTO pgml.schema_migrations (version) VALUES ('0043_worker_serving') ON CONFLICT DO NOTHING;
