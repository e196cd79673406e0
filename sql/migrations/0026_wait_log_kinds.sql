
INSERT INTO pgml.schema_migrations (version) VALUES ('0026_wait_log_kinds') ON CONFLICT DO NOTHING;
