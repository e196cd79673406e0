-- Hub policy: which Hugging Face model ids a job may download (the administrator's allowlist), checked at submit
-- and again at claim.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- A model_name that is a hub id, read as pgml_tuned.models.resolve reads it: not pgml:..., not a directory
-- ('/…', './…', '~…').
CREATE OR REPLACE FUNCTION pgml._is_hub_id(model_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT model_name IS NOT NULL AND btrim(model_name) <> ''
       AND NOT (starts_with(model_name, 'pgml:') OR starts_with(model_name, '/') OR starts_with(model_name, './')
                OR starts_with(model_name, '~'))
$$;

CREATE OR REPLACE FUNCTION pgml._hub_pattern_matches(pattern text, model_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN right(pattern, 1) = '*' THEN starts_with(lower(model_name), lower(left(pattern, -1)))
                ELSE lower(model_name) = lower(pattern) END
$$;

-- true when model_name may be used as far as the allow-list goes: it is not a hub id, the list is empty, or an
-- entry matches it. (It does not follow stored models to their base: pgml.check_hub_model does.)
CREATE OR REPLACE FUNCTION pgml.hub_model_allowed(model_name text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT NOT pgml._is_hub_id(model_name)
        OR NOT EXISTS (SELECT 1 FROM pgml.hub_allowlist)
        OR EXISTS (SELECT 1 FROM pgml.hub_allowlist a WHERE pgml._hub_pattern_matches(a.pattern, model_name))
$$;

-- The stored model a pgml:<project> / pgml:model:<id> name means for `owner` (the job's submitter): only models it
-- may read (its own, or any for an administrator); pgml:<project> is that project's latest successful model.
-- queries.sql (resolve_model_ref, the child) and the allow-list check below share it.
CREATE OR REPLACE FUNCTION pgml._model_ref(model_id bigint, project text, owner name)
RETURNS TABLE (id bigint, status text, base_model text, task text, project_name text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_model_ref.model_id IS NOT NULL AND m.id = _model_ref.model_id)
           OR (_model_ref.model_id IS NULL AND p.name = _model_ref.project AND m.status = 'successful'))
      AND (m.owner = _model_ref.owner
           OR EXISTS (SELECT 1 FROM pg_roles r
                      WHERE r.rolname = _model_ref.owner AND pg_has_role(r.oid, 'pgml_admin', 'MEMBER')))
    ORDER BY (p.owner = _model_ref.owner) DESC, m.id DESC
    LIMIT 1
$$;

-- Why the allow-list refuses model_name for a job of `owner` (task: NULL = one that loads a model), or no row
-- when it does not: the hub id itself, or the hub model a stored adapter loads onto (followed through stored
-- models). A name that resolves to nothing is left to the worker, which says what is wrong with it. `error` is
-- the message and hint in one, as a failed job's error says it.
CREATE OR REPLACE FUNCTION pgml._hub_refusal(model_name text, owner name, task text DEFAULT NULL)
RETURNS TABLE (message text, hint text, error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name  text := _hub_refusal.model_name;
    v_ref   text;
    v_base  text;
    v_found boolean;
    v_list  text;
    v_count bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgml.hub_allowlist) THEN
        RETURN;  -- the default: every hub model may be used
    END IF;
    IF _hub_refusal.task IS NOT NULL
       AND NOT coalesce((SELECT t.loads_model FROM pgml.tasks t WHERE t.name = _hub_refusal.task), true) THEN
        RETURN;
    END IF;
    FOR hop IN 1..32 LOOP  -- a chain of stored models ends at a hub id, a directory or a full model
        IF pgml._is_hub_id(v_name) THEN
            IF pgml.hub_model_allowed(v_name) THEN
                RETURN;
            END IF;
            SELECT string_agg(quote_literal(s.pattern), ', ' ORDER BY s.pattern), max(s.n)
            INTO v_list, v_count
            FROM (SELECT a.pattern, count(*) OVER () AS n FROM pgml.hub_allowlist a ORDER BY a.pattern LIMIT 20) s;
            message := format('hub model %L%s is not on the allow-list of hub models (pgml.hub_allowlist)', v_name,
                              CASE WHEN v_name IS DISTINCT FROM _hub_refusal.model_name
                                   THEN format(', the base model of %L,', _hub_refusal.model_name) ELSE '' END);
            hint := format('allowed: %s%s; use one of those, or ask an administrator to add it: '
                           'SELECT pgml.hub_allow(%L)', v_list,
                           CASE WHEN v_count > 20 THEN format(' and %s more (SELECT pattern FROM pgml.hub_allowlist)',
                                                              v_count - 20) ELSE '' END,
                           lower(v_name));
            error := format('%s (%s)', message, hint);
            RETURN NEXT;
            RETURN;
        END IF;
        IF v_name IS NULL OR NOT starts_with(v_name, 'pgml:') THEN
            RETURN;  -- a directory on the workers (the operator put it there), or nothing
        END IF;
        v_ref := substr(v_name, 6);
        IF starts_with(v_ref, 'model:') THEN
            IF substr(v_ref, 7) !~ '^[0-9]{1,18}$' THEN
                RETURN;  -- not a model id: the worker refuses the name itself
            END IF;
            SELECT true, r.base_model INTO v_found, v_base FROM pgml._model_ref(substr(v_ref, 7)::bigint, NULL, _hub_refusal.owner) r;
        ELSE
            SELECT true, r.base_model INTO v_found, v_base FROM pgml._model_ref(NULL, v_ref, _hub_refusal.owner) r;
        END IF;
        IF NOT coalesce(v_found, false) THEN
            RETURN;  -- no such model for this owner: the worker says so
        END IF;
        v_name := v_base;  -- a LoRA adapter loads onto its recorded base; a full model has none
        v_found := NULL;
    END LOOP;
END $$;

-- The same for the caller (session_user's stored models): for the SQL API and the inference lane. A worker
-- checks a job with pgml._hub_refusal (the job's submitter, not the worker's login, owns the models it names).
CREATE OR REPLACE FUNCTION pgml.check_hub_model(model_name text) RETURNS void
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgml._refuse_hub_model(check_hub_model.model_name, session_user)
$$;

-- Enforced at submit: the job row pgml._submit() inserts (status 'submitting') and the moment it becomes
-- queued (the list may have changed while its rows were copied), and when an administrator changes the
-- model_name of a waiting job. A requeue (running → queued) is not a submission: the worker re-checks it.
CREATE OR REPLACE FUNCTION pgml._job_hub_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status = 'submitting' OR NEW.model_name IS DISTINCT FROM OLD.model_name THEN
        PERFORM pgml._refuse_hub_model(NEW.model_name, NEW.submitted_by, NEW.task);
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION pgml.hub_disallow(pattern text) RETURNS pgml.hub_allowlist
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row pgml.hub_allowlist;
BEGIN
    DELETE FROM pgml.hub_allowlist a WHERE a.pattern = lower(hub_disallow.pattern) RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('no allow-list entry %L', hub_disallow.pattern),
            HINT = 'SELECT pattern FROM pgml.hub_allowlist lists them (patterns are stored in lower case)';
    END IF;
    RETURN v_row;
END $$;

-- pgml._refuse_hub_model: as in 0011, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml._refuse_hub_model(model_name text, owner name, task text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM pgml._hub_refusal(_refuse_hub_model.model_name, _refuse_hub_model.owner,
                                           _refuse_hub_model.task) h;
    IF r.message IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = r.message,
            HINT = r.hint,
            ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

-- pgml.hub_allow: as in 0011, each pgml._fail a RAISE
CREATE OR REPLACE FUNCTION pgml.hub_allow(pattern text, note text DEFAULT NULL) RETURNS pgml.hub_allowlist
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row pgml.hub_allowlist;
BEGIN
    IF hub_allow.pattern = '*' THEN
        RAISE EXCEPTION USING MESSAGE = 'pattern ''*'' would allow every hub model',
            HINT = 'an empty allow-list allows every hub model: remove the entries instead '
            '(SELECT pgml.hub_disallow(pattern) FROM pgml.hub_allowlist)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF hub_allow.pattern IS NULL
       OR NOT (hub_allow.pattern ~ '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$'
               OR hub_allow.pattern ~ '^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]*)?\*$') THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a hub model id or pattern', coalesce(quote_literal(hub_allow.pattern),
                                                                                  'NULL')),
            HINT = 'write an exact id (''org/name'', or a legacy ''name'') or a prefix ending in * (''org/*'', '
            '''org/bert-*''); stored models (pgml:...) and worker directories are not subject to the list',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO pgml.hub_allowlist AS a (pattern, note, added_by)
    VALUES (lower(hub_allow.pattern), hub_allow.note, session_user)
    ON CONFLICT ON CONSTRAINT hub_allowlist_pkey
        DO UPDATE SET note = coalesce(EXCLUDED.note, a.note), added_by = EXCLUDED.added_by,
                      added_at = clock_timestamp()
    RETURNING * INTO v_row;
    RETURN v_row;
END $$;

CREATE OR REPLACE TRIGGER jobs_hub_allowlist BEFORE INSERT OR UPDATE OF status, model_name ON pgml.jobs
    FOR EACH ROW WHEN (NEW.status IN ('submitting', 'queued')) EXECUTE FUNCTION pgml._job_hub_check();
