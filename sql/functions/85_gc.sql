-- Garbage collection: pgml.gc() and what it may remove.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- What pgml.gc would free, one row per model / job and kind (see above). `cutoff`: log rows created before it.
CREATE OR REPLACE FUNCTION pgml._gc_candidates(keep_last integer, cutoff timestamptz, include_kept boolean)
RETURNS TABLE (kind text, project text, job_id bigint, model_id bigint, items bigint, bytes bigint, note text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH successful AS (
        SELECT m.id, m.project_id, m.task, m.metrics,
               pg_catalog.row_number() OVER (PARTITION BY m.project_id ORDER BY m.id DESC) AS newest
        FROM pgml.models m WHERE m.status = 'successful'
    ), best AS (
        SELECT DISTINCT ON (s.project_id) s.id
        FROM successful s, LATERAL pgml._key_metric(s.metrics, s.task) k
        WHERE k.value IS NOT NULL
        ORDER BY s.project_id, CASE WHEN k.higher THEN -k.value ELSE k.value END, s.id DESC
    ), referenced AS (
        SELECT pg_catalog.substring(m.base_model, '^pgml:model:([0-9]+)$')::bigint AS id FROM pgml.models m
        UNION
        SELECT pg_catalog.substring(j.model_name, '^pgml:model:([0-9]+)$')::bigint FROM pgml.jobs j
        WHERE j.status IN ('queued', 'running')
    ), ended AS (
        SELECT j.id, j.project_id, j.keep_snapshot FROM pgml.jobs j
        WHERE j.status IN ('succeeded', 'failed', 'cancelled') AND (include_kept OR NOT j.keep_snapshot)
    )
    SELECT 'model_files', p.name, NULL::bigint, s.id, f.parts, f.bytes,
           pg_catalog.format('model %s (#%s newest of its project): not deployed, not the best', s.id, s.newest)
    FROM successful s
    JOIN pgml.projects p ON p.id = s.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS parts, coalesce(pg_catalog.sum(pg_catalog.length(fp.data)), 0)::bigint AS bytes
                        FROM pgml.file_parts fp WHERE fp.model_id = s.id) f
    WHERE s.newest > greatest(keep_last, 1)
      AND s.id IS DISTINCT FROM pgml._deployed_model(s.project_id)
      AND s.id NOT IN (SELECT b.id FROM best b)
      AND s.id NOT IN (SELECT r.id FROM referenced r WHERE r.id IS NOT NULL)
      AND f.parts > 0
    UNION ALL
    SELECT 'logs', p.name, NULL::bigint, l.model_id, l.n, l.bytes,
           pg_catalog.format('log rows before %s', cutoff)
    FROM (SELECT lg.model_id, pg_catalog.count(*) AS n, pg_catalog.sum(pg_catalog.pg_column_size(lg.*))::bigint AS bytes
          FROM pgml.logs lg
          WHERE cutoff IS NOT NULL AND lg.created_at < cutoff
          GROUP BY lg.model_id) l
    JOIN pgml.models m ON m.id = l.model_id AND m.status <> 'in_progress'
    JOIN pgml.projects p ON p.id = m.project_id
    UNION ALL
    SELECT 'checkpoints', p.name, e.id, NULL::bigint, c.n, c.bytes,
           CASE WHEN e.keep_snapshot THEN 'kept by materialize_snapshot' ELSE 'left by an ended job' END
    FROM ended e
    JOIN pgml.projects p ON p.id = e.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(ck.bytes), 0)::bigint AS bytes
                        FROM pgml.checkpoints ck WHERE ck.job_id = e.id) c
    WHERE c.n > 0
    UNION ALL
    SELECT 'job_rows', p.name, e.id, NULL::bigint, r.n, r.bytes,
           CASE WHEN e.keep_snapshot THEN 'kept by materialize_snapshot' ELSE 'left by an ended job' END
    FROM ended e
    JOIN pgml.projects p ON p.id = e.project_id
    CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS n, coalesce(pg_catalog.sum(pg_catalog.pg_column_size(jr.*)), 0)::bigint AS bytes
                        FROM pgml.job_rows jr WHERE jr.job_id = e.id) r
    WHERE r.n > 0
$$;

-- pgml.gc: list (apply => false, the default) or free (apply => true) what old jobs hold; see the top of this file.
CREATE OR REPLACE FUNCTION pgml.gc(keep_last integer DEFAULT 1, logs_older_than interval DEFAULT NULL,
                                   include_kept boolean DEFAULT false, apply boolean DEFAULT false)
RETURNS TABLE (kind text, project text, job_id bigint, model_id bigint, items bigint, bytes bigint, note text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cutoff timestamptz;
    r record;
BEGIN
    IF NOT pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('pgml.gc: %s is not a member of pgml_admin', session_user),
            HINT = 'run pgml-tuned gc as an administrator''s login (GRANT pgml_admin TO <login>)';
    END IF;
    IF keep_last IS NULL OR keep_last < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.gc: keep_last must be at least 1, not %s', keep_last),
            HINT = 'every project keeps its newest model (and its deployed and its best); --keep-last 1 keeps no more';
    END IF;
    IF logs_older_than IS NOT NULL AND logs_older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('pgml.gc: logs_older_than must not be negative (%s)', logs_older_than),
            HINT = 'give an age such as ''30 days''';
    END IF;
    v_cutoff := pg_catalog.clock_timestamp() - logs_older_than;
    FOR r IN SELECT * FROM pgml._gc_candidates(keep_last, v_cutoff, include_kept) c ORDER BY c.kind, c.project, c.model_id, c.job_id LOOP
        IF apply THEN
            IF r.kind = 'model_files' THEN
                -- checked again at the delete: a model deployed since the listing keeps its files
                DELETE FROM pgml.file_parts fp
                WHERE fp.model_id = r.model_id
                  AND r.model_id IS DISTINCT FROM (SELECT pgml._deployed_model(m.project_id) FROM pgml.models m
                                                   WHERE m.id = r.model_id);
                IF FOUND THEN
                    UPDATE pgml.models m SET files_freed_at = pg_catalog.clock_timestamp() WHERE m.id = r.model_id;
                END IF;
            ELSIF r.kind = 'logs' THEN
                DELETE FROM pgml.logs lg WHERE lg.model_id = r.model_id AND lg.created_at < v_cutoff;
            ELSIF r.kind = 'checkpoints' THEN
                DELETE FROM pgml.checkpoints ck WHERE ck.job_id = r.job_id
                  AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job_id
                              AND j.status IN ('succeeded', 'failed', 'cancelled'));
            ELSIF r.kind = 'job_rows' THEN
                DELETE FROM pgml.job_rows jr WHERE jr.job_id = r.job_id
                  AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job_id
                              AND j.status IN ('succeeded', 'failed', 'cancelled'));
            END IF;
        END IF;
        kind := r.kind; project := r.project; job_id := r.job_id; model_id := r.model_id;
        items := r.items; bytes := r.bytes; note := r.note;
        RETURN NEXT;
    END LOOP;
    -- A job committed while 'submitting' (possible before the constraint trigger jobs_submitted_at_commit,
    -- 50_submit.sql: pgml._submit called on its own) was never queued and never will be: it goes, with its model
    -- row and its table. (Another session's submission in progress is not committed, so not seen here.)
    FOR r IN
        SELECT j.id AS job, j.model_id, p.name AS project, j.created_at,
               pg_catalog.pg_total_relation_size(pg_catalog.to_regclass(
                   pg_catalog.format('pgml_rows.%I', pgml._job_table(j.id)))) AS size
        FROM pgml.jobs j JOIN pgml.projects p ON p.id = j.project_id
        WHERE j.status = 'submitting'
        ORDER BY j.id
    LOOP
        kind := 'submitting'; project := r.project; job_id := r.job; model_id := r.model_id; items := 1;
        bytes := coalesce(r.size, 0);
        note := pg_catalog.format('job %s left in ''submitting'' since %s (never queued)', r.job, r.created_at);
        IF apply THEN
            -- the job goes with its model (ON DELETE CASCADE); its table with the job (jobs_tables_deleted)
            DELETE FROM pgml.models m WHERE m.id = r.model_id
              AND EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = r.job AND j.status = 'submitting')
              AND NOT EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.model_id = r.model_id AND j.id <> r.job);
            DELETE FROM pgml.jobs j WHERE j.id = r.job AND j.status = 'submitting';
        END IF;
        RETURN NEXT;
    END LOOP;
    -- A job's rows in a table of its own (pgml_rows.job_<id>, when a later migration keeps them there): dropped
    -- when the job ended and nothing keeps it, or when its job is gone. Dropping returns the space at once.
    FOR r IN
        SELECT c.relname::text AS relname, j.id AS job, p.name AS project, j.keep_snapshot AS kept,
               pg_catalog.pg_total_relation_size(c.oid) AS size
        FROM pg_catalog.pg_class c
        LEFT JOIN pgml.jobs j ON j.id = CASE WHEN c.relname ~ '^job_[0-9]{1,18}$'
                                             THEN pg_catalog.substr(c.relname::text, 5)::bigint END
        LEFT JOIN pgml.projects p ON p.id = j.project_id
        WHERE c.relnamespace = pg_catalog.to_regnamespace('pgml_rows') AND c.relkind = 'r'
          AND c.relname ~ '^job_[0-9]{1,18}$'
          AND (j.id IS NULL OR (j.status IN ('succeeded', 'failed', 'cancelled') AND (include_kept OR NOT j.keep_snapshot)))
        ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM pgml_rows.%I', r.relname) INTO items;
        kind := 'job_table'; project := r.project; job_id := r.job; model_id := NULL; bytes := r.size;
        note := CASE WHEN r.job IS NULL THEN pg_catalog.format('pgml_rows.%I: its job is gone', r.relname)
                     WHEN r.kept THEN pg_catalog.format('pgml_rows.%I: kept by materialize_snapshot', r.relname)
                     ELSE pg_catalog.format('pgml_rows.%I: left by an ended job', r.relname) END;
        IF apply AND NOT pgml._drop_unlocked('pgml_rows', r.relname) THEN  -- never waits on a user's lock
            note := note || ' (in use: not dropped; the workers'' sweep drops it once it is free)';
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
