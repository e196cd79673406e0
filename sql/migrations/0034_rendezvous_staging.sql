-- 0034_rendezvous_staging: two places only pgml-tuned itself may use.
--   * pgml.gang_secrets: the rendezvous secret of a gang's attempt (pgml_tuned/child/rendezvous.py). The leader
--     worker makes it when it opens the gang (gang_open), its members read it when they join (gang_join); every
--     rank proves it at the rendezvous before the job's process group forms. Only the workers' login reads it
--     (90_grants.sql): not the submitter, whose pgml.jobs rows are readable to them.
--   * schema pgml_staging: load_dataset's staging tables (sql/functions/65_datasets.sql). Only pgml_owner creates
--     names there and nobody but the children (pgml_child, to COPY into their own table) may use it; a name has a
--     random part. A session that holds a lock on a staging table (any login can open a relation it sees in
--     pg_class, e.g. pg_relation_size(oid)) no longer stalls the load: the commit swaps the table in only if it
--     can lock it at once, and copies its rows otherwise; what is left is dropped by a later pass.
-- Plain SQL, idempotent, runnable with psql by an administrator.

CREATE TABLE IF NOT EXISTS pgml.gang_secrets (
    job_id  bigint PRIMARY KEY REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    secret  text NOT NULL
);

CREATE SCHEMA IF NOT EXISTS pgml_staging;
ALTER SCHEMA pgml_staging OWNER TO pgml_owner;

INSERT INTO pgml.schema_migrations (version) VALUES ('0034_rendezvous_staging') ON CONFLICT DO NOTHING;
