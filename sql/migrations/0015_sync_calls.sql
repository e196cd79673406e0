
INSERT INTO pgml.schema_migrations (version) VALUES ('0015_sync_calls') ON CONFLICT DO NOTHING;
