
INSERT INTO pgml.schema_migrations (version) VALUES ('0029_async_bookkeeping') ON CONFLICT DO NOTHING;
