
INSERT INTO pgml.schema_migrations (version) VALUES ('0006_typed_notices') ON CONFLICT DO NOTHING;
