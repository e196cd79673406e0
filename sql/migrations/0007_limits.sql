
INSERT INTO pgml.schema_migrations (version) VALUES ('0007_limits') ON CONFLICT DO NOTHING;
