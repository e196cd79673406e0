-- The whole schema with plain psql, for those who do not run `pgml-tuned migrate`:
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- It is also the list `pgml-tuned migrate` reads (a test checks that it names every file of migrations/ and
-- functions/): the functions tables' constraints call, every migration in order (each records itself in
-- pgml.schema_migrations, and is skipped once recorded there: pending.psql), then every other
-- file of functions/, grants last; all in one transaction, under the lock concurrent migrates take.
\set ON_ERROR_STOP on
\set QUIET on
BEGIN;
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgml-tuned migrate')) AS pgml_locked \gset
SET LOCAL check_function_bodies = off;  -- the files of functions/ call each other in any order
\ir functions/00_table_checks.sql
\set pgml_version 0001_schema
\ir pending.psql
\if :pgml_pending
\ir migrations/0001_schema.sql
\endif
\set pgml_version 0002_secrets
\ir pending.psql
\if :pgml_pending
\ir migrations/0002_secrets.sql
\endif
\set pgml_version 0003_tune
\ir pending.psql
\if :pgml_pending
\ir migrations/0003_tune.sql
\endif
\set pgml_version 0004_ops
\ir pending.psql
\if :pgml_pending
\ir migrations/0004_ops.sql
\endif
\set pgml_version 0005_checkpoints
\ir pending.psql
\if :pgml_pending
\ir migrations/0005_checkpoints.sql
\endif
\set pgml_version 0006_typed_notices
\ir pending.psql
\if :pgml_pending
\ir migrations/0006_typed_notices.sql
\endif
\set pgml_version 0007_limits
\ir pending.psql
\if :pgml_pending
\ir migrations/0007_limits.sql
\endif
\set pgml_version 0008_security
\ir pending.psql
\if :pgml_pending
\ir migrations/0008_security.sql
\endif
\set pgml_version 0009_secrets
\ir pending.psql
\if :pgml_pending
\ir migrations/0009_secrets.sql
\endif
\set pgml_version 0010_child
\ir pending.psql
\if :pgml_pending
\ir migrations/0010_child.sql
\endif
\set pgml_version 0011_hub_policy
\ir pending.psql
\if :pgml_pending
\ir migrations/0011_hub_policy.sql
\endif
\set pgml_version 0012_load_dataset
\ir pending.psql
\if :pgml_pending
\ir migrations/0012_load_dataset.sql
\endif
\set pgml_version 0013_loopback
\ir pending.psql
\if :pgml_pending
\ir migrations/0013_loopback.sql
\endif
\set pgml_version 0014_serving
\ir pending.psql
\if :pgml_pending
\ir migrations/0014_serving.sql
\endif
\set pgml_version 0015_sync_calls
\ir pending.psql
\if :pgml_pending
\ir migrations/0015_sync_calls.sql
\endif
\set pgml_version 0016_predict_batch
\ir pending.psql
\if :pgml_pending
\ir migrations/0016_predict_batch.sql
\endif
\set pgml_version 0017_row_columns
\ir pending.psql
\if :pgml_pending
\ir migrations/0017_row_columns.sql
\endif
\set pgml_version 0018_log_kinds
\ir pending.psql
\if :pgml_pending
\ir migrations/0018_log_kinds.sql
\endif
\set pgml_version 0019_cleanup
\ir pending.psql
\if :pgml_pending
\ir migrations/0019_cleanup.sql
\endif
\set pgml_version 0020_log_notices
\ir pending.psql
\if :pgml_pending
\ir migrations/0020_log_notices.sql
\endif
\set pgml_version 0021_direct_errors
\ir pending.psql
\if :pgml_pending
\ir migrations/0021_direct_errors.sql
\endif
\set pgml_version 0022_fleet
\ir pending.psql
\if :pgml_pending
\ir migrations/0022_fleet.sql
\endif
\set pgml_version 0023_resources
\ir pending.psql
\if :pgml_pending
\ir migrations/0023_resources.sql
\endif
\set pgml_version 0024_job_tables
\ir pending.psql
\if :pgml_pending
\ir migrations/0024_job_tables.sql
\endif
\set pgml_version 0025_request_locks
\ir pending.psql
\if :pgml_pending
\ir migrations/0025_request_locks.sql
\endif
\set pgml_version 0026_wait_log_kinds
\ir pending.psql
\if :pgml_pending
\ir migrations/0026_wait_log_kinds.sql
\endif
\set pgml_version 0027_gangs
\ir pending.psql
\if :pgml_pending
\ir migrations/0027_gangs.sql
\endif
\set pgml_version 0028_transform_errors
\ir pending.psql
\if :pgml_pending
\ir migrations/0028_transform_errors.sql
\endif
\set pgml_version 0029_async_bookkeeping
\ir pending.psql
\if :pgml_pending
\ir migrations/0029_async_bookkeeping.sql
\endif
\set pgml_version 0030_job_row_order
\ir pending.psql
\if :pgml_pending
\ir migrations/0030_job_row_order.sql
\endif
\set pgml_version 0031_cheaper_job_end
\ir pending.psql
\if :pgml_pending
\ir migrations/0031_cheaper_job_end.sql
\endif
\set pgml_version 0033_fair_lanes
\ir pending.psql
\if :pgml_pending
\ir migrations/0033_fair_lanes.sql
\endif
\set pgml_version 0034_rendezvous_staging
\ir pending.psql
\if :pgml_pending
\ir migrations/0034_rendezvous_staging.sql
\endif
\set pgml_version 0035_serving_role
\ir pending.psql
\if :pgml_pending
\ir migrations/0035_serving_role.sql
\endif
\set pgml_version 0036_tune_wait
\ir pending.psql
\if :pgml_pending
\ir migrations/0036_tune_wait.sql
\endif
\set pgml_version 0040_retrieval_tasks
\ir pending.psql
\if :pgml_pending
\ir migrations/0040_retrieval_tasks.sql
\endif
\set pgml_version 0041_embed_rank
\ir pending.psql
\if :pgml_pending
\ir migrations/0041_embed_rank.sql
\endif
\set pgml_version 0043_worker_serving
\ir pending.psql
\if :pgml_pending
\ir migrations/0043_worker_serving.sql
\endif
\set pgml_version 0044_embed_vectors
\ir pending.psql
\if :pgml_pending
\ir migrations/0044_embed_vectors.sql
\endif
\ir functions/10_security.sql
\ir functions/20_secrets.sql
\ir functions/30_loopback.sql
\ir functions/40_hub.sql
\ir functions/50_submit.sql
\ir functions/55_jobs.sql
\ir functions/60_child.sql
\ir functions/65_datasets.sql
\ir functions/70_requests.sql
\ir functions/75_models.sql
\ir functions/76_imports.sql
\ir functions/80_fleet.sql
\ir functions/85_gc.sql
\ir functions/88_training_arg_types.sql
\ir functions/90_grants.sql
COMMIT;
