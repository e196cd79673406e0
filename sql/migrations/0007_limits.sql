-- 0007_limits: bounds every submitted job must respect, checked as the job row is written (by pgml.tune()
-- or any later entry point), so nothing out of bounds is ever queued. Plain SQL, idempotent, runnable with psql.

CREATE OR REPLACE FUNCTION pgml._check_job_limits() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_bytes integer := octet_length(NEW.hyperparams::text);
BEGIN
    IF v_bytes > 65536 THEN
        RAISE EXCEPTION USING ERRCODE = 'program_limit_exceeded',
            MESSAGE = format('hyperparams is %s bytes of JSON; at most 65536 are accepted', v_bytes),
            HINT = 'hyperparams holds settings; put data in the relation the job trains on';
    END IF;
    IF NEW.max_attempts > 20 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('max_attempts %s is more than 20', NEW.max_attempts),
            HINT = 'max_attempts counts workers lost mid-job; a few (the default is 3) is plenty';
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS jobs_limits ON pgml.jobs;
CREATE TRIGGER jobs_limits BEFORE INSERT ON pgml.jobs FOR EACH ROW EXECUTE FUNCTION pgml._check_job_limits();

INSERT INTO pgml.schema_migrations (version) VALUES ('0007_limits') ON CONFLICT DO NOTHING;
