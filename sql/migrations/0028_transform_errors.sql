
INSERT INTO pgml.schema_migrations (version) VALUES ('0028_transform_errors') ON CONFLICT DO NOTHING;
