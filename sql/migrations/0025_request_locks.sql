
INSERT INTO pgml.schema_migrations (version) VALUES ('0025_request_locks') ON CONFLICT DO NOTHING;
