-- 0024_job_tables: the rows a job copies at submit time go into a table of the job's own,
-- pgml_rows.job_<id> (c1 .. ck text, exactly the job's columns), instead of all jobs' rows in pgml.job_rows.
-- Measured with bench/submit.py (25,000 IMDB-sized rows, server CPU per statement, PostgreSQL 15): copying into the
-- shared table cost 91 ms against 59 ms for a plain INSERT ... SELECT of the same rows (0.65x); its parts were the
-- count(*) afterwards (~11 ms), the BRIN index (~6), row_number() for the order (~5), the job_id column and eight
-- columns where two are used (~5), and reusing the vacuumed pages of earlier jobs (~4). A table of its own needs
-- none of them: the rows are in insertion order (one writer, appended, never updated), its size is
-- pg_total_relation_size, the INSERT counts the rows, and the end of the job drops the table, which returns the
-- space at once (no DELETE, no VACUUM: the database no longer grows with every job).
-- The tables live in schema pgml_rows, where only pgml_owner may create anything (nobody can take a future job's
-- name first). The submitter may INSERT into its job's table only while pgml.tune() runs (pgml._submitted revokes
-- it) and may read it until the job ends, as it read its rows in pgml.job_rows before; pgml_admin may read them.
-- Jobs submitted before this migration keep their rows in pgml.job_rows and are read from there.
-- pgml._submitted(job_id) without a count keeps counting (load_dataset, tune_requests).

CREATE SCHEMA IF NOT EXISTS pgml_rows;
ALTER SCHEMA pgml_rows OWNER TO pgml_owner;

DROP FUNCTION IF EXISTS pgml._submitted(bigint);

INSERT INTO pgml.schema_migrations (version) VALUES ('0024_job_tables') ON CONFLICT DO NOTHING;
