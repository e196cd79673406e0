
INSERT INTO pgml.schema_migrations (version) VALUES ('0030_job_row_order') ON CONFLICT DO NOTHING;
