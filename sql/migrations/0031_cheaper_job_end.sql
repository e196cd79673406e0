-- Cheaper bookkeeping per job (bench/job_statements.py, bench/fleet.py).
--
-- The end of a job without rows of its own costs no search for job tables. pgml._job_tables_drop (0024) looks through
-- every table of schema pgml_rows for the ended job's and for leftovers of other ended jobs: ~170 us of server time
-- at every job's end (track_functions, 1000 noop jobs), a tenth of what a short job's own bookkeeping costs the
-- queue. A job has a table only when pgml.tune() copied rows for it, which is when jobs.snapshot_columns is set
-- (pgml._job_table_begin refuses a job without them), so the trigger fires for those jobs only; a leftover table
-- (one a user's open transaction held at its job's end) is dropped at the next end of a job that had rows, or by
-- pgml-tuned gc, as before. The trigger starts from its last definition (0024).

DROP TRIGGER IF EXISTS jobs_table_ended ON pgml.jobs;
CREATE TRIGGER jobs_table_ended AFTER UPDATE OF status ON pgml.jobs FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status
          AND NOT NEW.keep_snapshot AND NEW.snapshot_columns IS NOT NULL)
    EXECUTE FUNCTION pgml._job_table_ended();

-- The child's final transaction begins without calling pgml._child_remember: its two settings are set right here. A
-- call of that function costs ~40 us (its own search_path, set and reset around two set_config calls), once per
-- job. Starts from its last definition (0010).
CREATE OR REPLACE FUNCTION pgml._child_files_begin(job_id bigint, ticket text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_files_begin.job_id, ticket, true);
BEGIN
    DELETE FROM pgml.file_parts f WHERE f.model_id = v.model_id;
    -- what pgml._child_remember sets: the file tables' insert trigger checks every row against them
    PERFORM pg_catalog.set_config('pgml.child_job', v.id::text, true),
            pg_catalog.set_config('pgml.child_ticket', ticket, true);
    RETURN v.model_id;
END $$;

SELECT pgml._own_everything();

INSERT INTO pgml.schema_migrations (version) VALUES ('0031_cheaper_job_end') ON CONFLICT DO NOTHING;
