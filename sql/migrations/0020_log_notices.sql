
INSERT INTO pgml.schema_migrations (version) VALUES ('0020_log_notices') ON CONFLICT DO NOTHING;
