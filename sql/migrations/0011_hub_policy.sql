-- 0011_hub_policy: an administrators' allow-list of Hugging Face hub models (as PostgresML's
-- pgml.huggingface_whitelist). Empty (the default): every hub model may be used. Not empty: a job naming a hub
-- model id that matches no entry is refused when it is submitted, and again by the worker when it claims the job
-- (the list may have changed in between). Stored models (pgml:model:<id>, pgml:<project>) and directories on the
-- workers are not hub ids and are not subject to the list; a stored LoRA adapter's recorded base model is (it is
-- what loads from the hub), followed through stored models to the hub id at the end.
--
--   SELECT pgml.hub_allow('distilbert/*', 'the DistilBERT family');   -- pgml_admin only
--   SELECT pgml.hub_disallow('distilbert/*');
--   SELECT * FROM pgml.hub_allowlist;                                 -- anyone with pgml_user
--   SELECT pgml.hub_model_allowed('org/name');                        -- the check, for other code to call
--   SELECT pgml.check_hub_model('pgml:my_project');                   -- raises with a hint when refused

-- Patterns are stored in lower case and compared case-insensitively (the hub resolves ids that way): an exact id
-- ('org/name', or a legacy 'name'), or a prefix ending in '*' ('org/*' = every model of org, 'org/bert-*').
CREATE TABLE IF NOT EXISTS pgml.hub_allowlist (
    pattern  text PRIMARY KEY,
    note     text,
    added_by name NOT NULL DEFAULT session_user,
    added_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- tasks that load no model (the diagnostic noop) are not subject to the list: their model_name names nothing
ALTER TABLE pgml.tasks ADD COLUMN IF NOT EXISTS loads_model boolean NOT NULL DEFAULT true;
UPDATE pgml.tasks SET loads_model = false WHERE name = 'noop';

INSERT INTO pgml.schema_migrations (version) VALUES ('0011_hub_policy') ON CONFLICT DO NOTHING;
