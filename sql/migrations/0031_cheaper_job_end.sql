
INSERT INTO pgml.schema_migrations (version) VALUES ('0031_cheaper_job_end') ON CONFLICT DO NOTHING;
