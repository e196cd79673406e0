-- Imported models ("bring your own model", `pgml-tuned models import DIR --project NAME`): a local model directory
-- stored in pgml.files as a successful model of a project and deployed as its model, so that pgml:<project> serves
-- and starts from it with no hub. One transaction of the importer's session:
--
--   SELECT pgml.import_model_begin(project, task, base_model, files, source)  -- checks everything but the bytes;
--       a model 'in_progress' marked as an import, and this transaction allowed to store its files
--   COPY pgml.file_parts (model_id, path, part, data) FROM STDIN              -- the same statement and code
--       (pgml_tuned.files.copy_dir_in) a training child stores its model with; the insert trigger
--       (pgml._child_insert_check) lets only this transaction's own import through
--   SELECT * FROM pgml.import_model_finish(model_id)                          -- checks the stored bytes against
--       the list begin was given, the configuration files (no custom code), then: successful, deployed
--
-- A transaction that commits an import still 'in_progress' is refused at COMMIT (models_import_finished below),
-- so an import is all or nothing. The CLI checks the directory first (pgml_tuned.model_files) and says how to fix
-- what it refuses; these functions check again whatever they are given, for any client.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- Why a file of an imported model is refused (NULL: it is not). Weights are safetensors only: pickle files (what
-- torch.load reads) can run code when loaded; code files are never run (no trust_remote_code).
CREATE OR REPLACE FUNCTION pgml._import_file_refusal(path text, OUT message text, OUT hint text)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name   text := lower(regexp_replace(coalesce(path, ''), '^.*/', ''));
    v_suffix text := CASE WHEN strpos(v_name, '.') > 0 THEN regexp_replace(v_name, '^.*\.', '') END;
BEGIN
    IF path IS NULL OR path = '' OR length(path) > 1024 OR starts_with(path, '/') OR path ~ '[\\[:cntrl:]]'
       OR '..' = ANY (string_to_array(path, '/')) OR '' = ANY (string_to_array(path, '/')) THEN
        message := format('file %L is not a relative path inside the model directory', path);
        hint := 'a model''s files are named by their paths relative to its directory, without "..", "//" or "\"';
    ELSIF v_suffix IN ('bin', 'pt', 'pth', 'pkl', 'pickle', 'ckpt', 'joblib', 'npy', 'npz') THEN
        message := format('file %L is a pickle file: pickled weights can run code when they are loaded, so only '
                          'safetensors weights are imported', path);
        hint := CASE WHEN v_name = 'training_args.bin' OR v_name LIKE 'optimizer.%' OR v_name LIKE 'scheduler.%'
                          OR v_name LIKE 'rng_state%'
                     THEN format('%s is not part of the model (a training state file): delete it', path)
                     ELSE format('convert it to safetensors and delete %s: python -c "from transformers import '
                                 'AutoModel; AutoModel.from_pretrained(''DIR'').save_pretrained(''DIR'', '
                                 'safe_serialization=True)" (AutoModelFor... of its kind)', path) END;
    ELSIF v_suffix IN ('py', 'pyc', 'pyo', 'so', 'dll', 'dylib', 'sh', 'exe') THEN
        message := format('file %L is code: models that need their own code (trust_remote_code) are not imported',
                          path);
        hint := 'import a model whose architecture transformers has built in, without the code files';
    ELSIF v_suffix IN ('h5', 'msgpack', 'onnx', 'gguf', 'ggml', 'tflite', 'ot', 'keras') THEN
        message := format('file %L holds weights in a format pgml-tuned does not load (safetensors only)', path);
        hint := 'save the model with transformers as safetensors (save_pretrained(DIR, safe_serialization=True)), '
                'or delete the file if the directory has safetensors weights too';
    END IF;
END $$;

-- The stored bytes of one file of a model, reassembled (small files only: configuration).
CREATE OR REPLACE FUNCTION pgml._import_file_text(p_model_id bigint, p_path text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT convert_from(string_agg(f.data, ''::bytea ORDER BY f.part), 'UTF8')
    FROM pgml.file_parts f WHERE f.model_id = p_model_id AND f.path = p_path
$$;

-- Start an import: check the request, make the project (the owner's, with `task`) if it has none, and a model
-- 'in_progress' of it; this transaction may then store that model's files (COPY pgml.file_parts). `files`: the
-- directory's files as [{"path": "config.json", "bytes": 123}, ...]; `base_model`: what an adapter (a directory with
-- adapter_config.json) loads onto, as a model_name (pgml:<project>, pgml:model:<id>, an allowed hub id, a directory
-- under the workers' model directories); `source`: where it came from (recorded only). `owner`: an administrator
-- imports into another login's project (its pgml:<project> then serves it); everyone else into their own.
CREATE OR REPLACE FUNCTION pgml.import_model_begin(
    project_name text, task text, base_model text, files jsonb, source text DEFAULT NULL, owner name DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_who     name := pgml._submitter();
    v_owner   name := coalesce(import_model_begin.owner, pgml._submitter());
    v_project pgml.projects;
    v_model   bigint;
    v_file    jsonb;
    v_paths   text[] := ARRAY[]::text[];
    v_bytes   bigint := 0;
    v_bad     record;
    v_adapter boolean;
    v_ref     text;
    v_found   record;
BEGIN
    IF v_owner <> v_who AND NOT pg_has_role(v_who, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING MESSAGE = format('%s may not import a model into a project of %s: only administrators import '
                                  'models for another login', v_who, v_owner),
            HINT = format('import it into a project of your own (leave the owner out), or ask a member of '
                                  'pgml_admin to import it for %s', v_owner),
            ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = v_owner AND pg_has_role(r.oid, 'pgml_user', 'MEMBER')) THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a pgml_user login: its models could not be used', v_owner),
            HINT = format('GRANT pgml_user TO %I, or import for another login', v_owner),
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF project_name IS NULL OR btrim(project_name) = '' OR length(project_name) > 200 THEN
        RAISE EXCEPTION USING MESSAGE = 'an import needs a project name (at most 200 characters)',
            HINT = 'pgml-tuned models import DIR --project NAME: the model is then pgml:NAME',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF task IS NULL OR task NOT IN ('text-classification', 'text-pair-classification', 'conversation') THEN
        RAISE EXCEPTION USING MESSAGE = format('task %s cannot be imported', coalesce(quote_literal(task), 'NULL')),
            HINT = 'imported models are of task text-classification, text-pair-classification or '
                           'conversation (causal language models)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name AND p.owner = v_owner;
    IF FOUND AND v_project.task <> task THEN
        RAISE EXCEPTION USING MESSAGE = format('project %L is a %s project, not %s', project_name, v_project.task, task),
            HINT = 'import it into another project (--project), or give the project''s task (--task)',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- the files: a list of paths and sizes, each path allowed, config.json or adapter_config.json among them
    IF files IS NULL OR jsonb_typeof(files) <> 'array' OR jsonb_array_length(files) = 0
       OR jsonb_array_length(files) > 10000 THEN
        RAISE EXCEPTION USING MESSAGE = 'files must be a JSON array of {"path": ..., "bytes": ...}, one per file of the model',
            HINT = 'pgml-tuned models import DIR lists them',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_file IN SELECT value FROM jsonb_array_elements(files) LOOP
        IF jsonb_typeof(v_file) <> 'object' OR jsonb_typeof(v_file -> 'path') <> 'string'
           OR jsonb_typeof(v_file -> 'bytes') <> 'number' OR (v_file ->> 'bytes') !~ '^[0-9]{1,15}$' THEN
            RAISE EXCEPTION USING MESSAGE = format('files: %s is not {"path": text, "bytes": integer}', left(v_file::text, 200)),
                HINT = 'pgml-tuned models import DIR lists them',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO v_bad FROM pgml._import_file_refusal(v_file ->> 'path');
        IF v_bad.message IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = v_bad.message,
                HINT = v_bad.hint,
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF (v_file ->> 'path') = ANY (v_paths) THEN
            RAISE EXCEPTION USING MESSAGE = format('files: %L is listed twice', v_file ->> 'path'),
                HINT = 'list each file once',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        v_paths := v_paths || (v_file ->> 'path');
        v_bytes := v_bytes + (v_file ->> 'bytes')::bigint;
    END LOOP;
    v_adapter := 'adapter_config.json' = ANY (v_paths);
    IF NOT v_adapter AND NOT 'config.json' = ANY (v_paths) THEN
        RAISE EXCEPTION USING MESSAGE = 'the model has no config.json (nor adapter_config.json): it is not a saved transformers '
                           'model or PEFT adapter',
            HINT = 'import the directory save_pretrained wrote (config.json, model.safetensors, the '
                           'tokenizer''s files)',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM unnest(v_paths) p WHERE p LIKE '%.safetensors') THEN
        RAISE EXCEPTION USING MESSAGE = 'the model has no .safetensors weights',
            HINT = 'save it with save_pretrained(DIR, safe_serialization=True) and import that directory',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    -- an adapter's base: resolvable now, under the rules every model_name follows, for the owner
    IF NOT v_adapter THEN
        IF base_model IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L given for a full model (it has no adapter_config.json)',
                                      base_model),
                HINT = 'a full model loads on its own: leave --base out',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF base_model IS NULL OR btrim(base_model) = '' THEN
        RAISE EXCEPTION USING MESSAGE = 'the adapter names no base model',
            HINT = 'pass --base (pgml:<project>, pgml:model:<id>, or a hub id on the allow-list), or set '
                           'base_model_name_or_path in its adapter_config.json',
            ERRCODE = 'invalid_parameter_value';
    ELSIF starts_with(base_model, 'pgml:') THEN
        v_ref := substr(base_model, 6);
        IF starts_with(v_ref, 'model:') AND substr(v_ref, 7) !~ '^[0-9]{1,18}$' THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L: write pgml:model:<id> with a numeric id', base_model),
                HINT = 'SELECT id FROM pgml.models lists them',
                ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT * INTO v_found FROM pgml._model_ref(CASE WHEN starts_with(v_ref, 'model:') THEN substr(v_ref, 7)::bigint END,
                                                   CASE WHEN NOT starts_with(v_ref, 'model:') THEN v_ref END, v_owner) r;
        IF v_found.id IS NULL OR v_found.status <> 'successful' THEN
            RAISE EXCEPTION USING MESSAGE = format('base model %L: %s has no such successful model', base_model, v_owner),
                HINT = 'name a model the owner may read: pgml:<project> (SELECT name FROM pgml.projects), '
                               'pgml:model:<id>, or import the base first',
                ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF starts_with(base_model, '/') THEN
        NULL;  -- a directory under the workers' model directories: each worker checks it when it loads the base
    ELSIF base_model ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$' AND strpos(base_model, '..') = 0
          AND strpos(base_model, '--') = 0 AND length(base_model) <= 96 THEN
        SELECT * INTO v_bad FROM pgml._hub_refusal(base_model, v_owner);
        IF v_bad.message IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = v_bad.message,
                HINT = v_bad.hint,
                ERRCODE = 'insufficient_privilege';
        END IF;
    ELSE
        RAISE EXCEPTION USING MESSAGE = format('base model %L is not a model reference', base_model),
            HINT = 'name a hub id (org/name), a stored model (pgml:<project> or pgml:model:<id>), or an '
                           'absolute directory under the workers'' model directories',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pgml.projects AS p (name, task, owner) VALUES (project_name, task, v_owner)
    ON CONFLICT ON CONSTRAINT projects_owner_name_key DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;
    SET CONSTRAINTS pgml.models_import_finished DEFERRED;  -- checked at COMMIT, whatever the caller set
    INSERT INTO pgml.models (project_id, status, task, model_name, base_model, hyperparams, owner)
    VALUES (v_project.id, 'in_progress', task, coalesce(left(source, 1000), 'import'),
            CASE WHEN v_adapter THEN base_model END,
            jsonb_build_object('import', jsonb_build_object('by', v_who, 'source', left(source, 1000), 'files', files,
                                                            'bytes', v_bytes)),
            v_owner)
    RETURNING id INTO v_model;
    PERFORM set_config('pgml.import_model', v_model::text, true);
    RETURN v_model;
END $$;

-- Finish an import begun in this transaction: the stored files must be exactly those begin was given (each whole),
-- the configuration files must ask for no code of their own; then the model is successful and its project's
-- deployed model. Returns what to use.
CREATE OR REPLACE FUNCTION pgml.import_model_finish(model_id bigint)
RETURNS TABLE (id bigint, project_name text, owner name, files integer, bytes bigint, ref text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_model   pgml.models;
    v_project pgml.projects;
    v_bad     record;
    v_path    text;
    v_config  jsonb;
    v_files   integer;
    v_bytes   bigint;
BEGIN
    SELECT * INTO v_model FROM pgml.models m WHERE m.id = import_model_finish.model_id;
    IF NOT FOUND OR NOT (v_model.hyperparams ? 'import') OR v_model.status <> 'in_progress'
       OR v_model.hyperparams -> 'import' ->> 'by' IS DISTINCT FROM pgml._submitter()::text
       OR current_setting('pgml.import_model', true) IS DISTINCT FROM v_model.id::text THEN
        RAISE EXCEPTION USING MESSAGE = format('model %s is not an import this transaction began', import_model_finish.model_id),
            HINT = 'SELECT pgml.import_model_begin(...), COPY its files, then pgml.import_model_finish(id), '
                           'in one transaction (pgml-tuned models import does)',
            ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- each listed file stored whole (parts 0..n-1, its size), nothing else stored
    SELECT l.path AS listed, s.path AS stored, l.bytes AS want, s.bytes AS got, s.parts, s.last_part
    INTO v_bad
    FROM (SELECT e ->> 'path' AS path, (e ->> 'bytes')::bigint AS bytes
          FROM jsonb_array_elements(v_model.hyperparams -> 'import' -> 'files') e) l
    FULL JOIN (SELECT f.path, sum(length(f.data))::bigint AS bytes, count(*) AS parts, max(f.part) AS last_part
               FROM pgml.file_parts f WHERE f.model_id = v_model.id GROUP BY f.path) s ON s.path = l.path
    WHERE l.path IS NULL OR s.path IS NULL OR l.bytes <> s.bytes OR s.parts <> s.last_part + 1
    ORDER BY coalesce(l.path, s.path) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING MESSAGE = CASE WHEN v_bad.listed IS NULL THEN format('file %L was stored but not listed', v_bad.stored)
                                WHEN v_bad.stored IS NULL THEN format('file %L was listed but not stored', v_bad.listed)
                                ELSE format('file %L: %s bytes listed, %s stored', v_bad.listed, v_bad.want, v_bad.got)
                           END,
            HINT = 'the directory changed while it was imported, or the client sent other files: import it '
                           'again',
            ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the stored configuration: valid JSON, no code of the model's own (auto_map, trust_remote_code)
    FOREACH v_path IN ARRAY ARRAY['config.json', 'tokenizer_config.json', 'adapter_config.json',
                                  'generation_config.json', 'preprocessor_config.json', 'processor_config.json',
                                  'special_tokens_map.json'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pgml.file_parts f WHERE f.model_id = v_model.id AND f.path = v_path);
        BEGIN
            v_config := pgml._import_file_text(v_model.id, v_path)::jsonb;
        EXCEPTION WHEN invalid_text_representation OR character_not_in_repertoire OR untranslatable_character THEN
            RAISE EXCEPTION USING MESSAGE = format('%s is not valid JSON', v_path),
                HINT = format('fix or remove %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END;
        IF jsonb_path_exists(v_config, 'lax $.**.auto_map') THEN
            RAISE EXCEPTION USING MESSAGE = format('%s has an "auto_map": the model needs code of its own (trust_remote_code), '
                                      'which pgml-tuned never runs', v_path),
                HINT = format('import a model of an architecture transformers has built in; if it is one, '
                                      'delete "auto_map" from %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_path_exists(v_config, 'lax $.**.trust_remote_code ? (@ == true)') THEN
            RAISE EXCEPTION USING MESSAGE = format('%s sets trust_remote_code: pgml-tuned never runs a model''s own code', v_path),
                HINT = format('delete trust_remote_code from %s', v_path),
                ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- safetensors: 8 bytes of header length, then that much JSON header, inside the file
    SELECT f.path INTO v_path FROM pgml.file_parts f
    WHERE f.model_id = v_model.id AND f.part = 0 AND f.path LIKE '%.safetensors'
      AND (length(f.data) < 8
           OR (get_byte(f.data, 0)::bigint + get_byte(f.data, 1)::bigint * 256 + get_byte(f.data, 2)::bigint * 65536
               + get_byte(f.data, 3)::bigint * 16777216 + get_byte(f.data, 4)::bigint * 4294967296) + 8
              > (SELECT sum(length(g.data)) FROM pgml.file_parts g WHERE g.model_id = v_model.id AND g.path = f.path)
           OR get_byte(f.data, 5) <> 0 OR get_byte(f.data, 6) <> 0 OR get_byte(f.data, 7) <> 0)
    ORDER BY f.path LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING MESSAGE = format('%s is not a safetensors file (its header is cut short or not there)', v_path),
            HINT = 'save the weights again with save_pretrained(DIR, safe_serialization=True)',
            ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT count(DISTINCT f.path), coalesce(sum(length(f.data)), 0) INTO v_files, v_bytes
    FROM pgml.file_parts f WHERE f.model_id = v_model.id;
    UPDATE pgml.models m SET status = 'successful', updated_at = clock_timestamp() WHERE m.id = v_model.id;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.id = v_model.project_id;
    INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
    VALUES (v_project.id, v_model.id, 'import', pgml._submitter());
    PERFORM pg_notify('pgml_deployments', '{"type": "deployed"}');  -- naming nothing (issue 20)
    PERFORM set_config('pgml.import_model', '', true);
    RETURN QUERY SELECT v_model.id, v_project.name, v_project.owner, v_files, v_bytes,
                        format('pgml:%s', v_project.name);
END $$;

-- At COMMIT: no import is left 'in_progress' (begun, its files perhaps stored, never finished): the transaction
-- is refused, so nothing of it stays.
CREATE OR REPLACE FUNCTION pgml._import_finished() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = NEW.id AND m.status = 'in_progress') THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = format('the import of model %s was not finished: nothing of it is kept', NEW.id),
            HINT = format('call SELECT * FROM pgml.import_model_finish(%s) after storing its files, before COMMIT',
                          NEW.id);
    END IF;
    RETURN NULL;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                   WHERE tgrelid = 'pgml.models'::regclass AND tgname = 'models_import_finished') THEN
        CREATE CONSTRAINT TRIGGER models_import_finished AFTER INSERT ON pgml.models
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.hyperparams ? 'import') EXECUTE FUNCTION pgml._import_finished();
    END IF;
END $$;
