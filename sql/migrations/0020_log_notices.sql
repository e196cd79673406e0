-- 0020_log_notices: new log rows wake whoever follows a job (the dashboard's live curves), as status changes
-- already do on pgml_job_status.
--
-- NOTIFY pgml_logs '{"type": "logs_written", "job_id": N}' once per statement that inserts log rows, per job in
-- it (pgml._child_log inserts one job's batch per statement, so this is one notice per batch, not per row). A
-- wake-up only, like every notice of the schema: a listener re-reads pgml.logs with its own rights (row-level
-- security decides what it sees); the payload says no more than pgml_job_status does (a job id).

CREATE OR REPLACE FUNCTION pgml._logs_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    FOR v_job IN SELECT DISTINCT n.job_id FROM new_rows n WHERE n.job_id IS NOT NULL LOOP
        PERFORM pg_catalog.pg_notify('pgml_logs',
            pg_catalog.json_build_object('type', 'logs_written', 'job_id', v_job)::text);
    END LOOP;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS logs_written ON pgml.logs;
CREATE TRIGGER logs_written AFTER INSERT ON pgml.logs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgml._logs_written();

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._logs_written() FROM PUBLIC;

INSERT INTO pgml.schema_migrations (version) VALUES ('0020_log_notices') ON CONFLICT DO NOTHING;
