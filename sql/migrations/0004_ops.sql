
INSERT INTO pgml.schema_migrations (version) VALUES ('0004_ops') ON CONFLICT DO NOTHING;
