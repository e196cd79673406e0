
ALTER TABLE pgml.models ADD COLUMN IF NOT EXISTS files_freed_at timestamptz;

INSERT INTO pgml.schema_migrations (version) VALUES ('0019_cleanup') ON CONFLICT DO NOTHING;
