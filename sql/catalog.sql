-- The catalog queries behind sql/schema.sql (pgml_tuned/catalog.py, written by scripts/schema_dump): the objects
-- of the schemas pgml-tuned owns, as facts that catalog.py prints in a normalised text form, the same on
-- PostgreSQL 15 and 18 whoever migrated. Every statement takes the schemas as %(schemas)s (a text[]).
-- Objects made at run time (a job's table in pgml_rows, a user's dataset table) are left out: the schema is what
-- the migrations and sql/functions make, not what the database holds.

-- name: catalog_schemas
SELECT n.nspname AS name, n.nspowner AS owner, n.nspacl::text[] AS acl, 'n' AS kind,
       pg_catalog.obj_description(n.oid, 'pg_namespace') AS comment
FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY (%(schemas)s)
ORDER BY 1;

-- name: catalog_extensions
SELECT e.extname AS name, n.nspname AS schema
FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
WHERE n.nspname = ANY (%(schemas)s) OR n.nspname LIKE 'pgml%%'
ORDER BY 1;

-- name: catalog_relations
-- Tables, views, sequences and partitioned tables (not indexes: catalog_indexes; not a job's own table)
SELECT c.oid, n.nspname AS schema, c.relname AS name, c.relkind AS kind, c.relowner AS owner, c.relacl::text[] AS acl,
       c.relrowsecurity AS rls, c.relforcerowsecurity AS force_rls, c.reloptions AS options,
       CASE WHEN c.relkind = 'v' THEN pg_catalog.pg_get_viewdef(c.oid, true) END AS view,
       CASE WHEN c.relkind = 'p' THEN pg_catalog.pg_get_partkeydef(c.oid) END AS partition_key,
       pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
       s.seqtypid::regtype::text AS seq_type, s.seqstart AS seq_start, s.seqincrement AS seq_increment,
       s.seqcycle AS seq_cycle, s.seqcache AS seq_cache, s.seqmin AS seq_min, s.seqmax AS seq_max,
       (SELECT d.refobjid::regclass::text || '.' || a.attname FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')
          AND d.refclassid = 'pg_class'::regclass) AS owned_by
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
WHERE n.nspname = ANY (%(schemas)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND NOT c.relispartition
  AND NOT (n.nspname = 'pgml_rows' AND c.relname ~ '^job_[0-9]+$')
  AND n.nspname <> 'pgml_staging'  -- a load's staging tables (0034): made at run time
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
                  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
                  WHERE c.relkind = 'S' AND d.objid = c.oid AND d.classid = 'pg_class'::regclass
                    AND d.refclassid = 'pg_class'::regclass AND tn.nspname = 'pgml_rows')
  AND NOT (n.nspname = 'pgml' AND c.relkind = 'r'
           AND (c.relname ~ '^_dataset_load_[0-9]+_[0-9]+$'
                OR c.relname IN (SELECT ds.name FROM pgml.datasets ds UNION ALL SELECT o.name FROM pgml.output_tables o)))
ORDER BY 2, 3;

-- name: catalog_columns
SELECT c.oid, a.attnum, a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, a.attidentity AS identity, a.attgenerated AS generated,
       pg_catalog.pg_get_expr(ad.adbin, ad.adrelid) AS default, a.attacl::text[] AS acl,
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation,
       pg_catalog.col_description(c.oid, a.attnum) AS comment
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
WHERE n.nspname = ANY (%(schemas)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY c.oid, a.attnum;

-- name: catalog_constraints
SELECT co.conrelid AS oid, co.conname AS name, pg_catalog.pg_get_constraintdef(co.oid, true) AS definition
FROM pg_catalog.pg_constraint co JOIN pg_catalog.pg_namespace n ON n.oid = co.connamespace
WHERE n.nspname = ANY (%(schemas)s) AND co.conrelid <> 0
  AND co.contype <> 'n'  -- PostgreSQL 18 keeps NOT NULL as constraints too: the columns say it
ORDER BY co.conrelid, co.conname;

-- name: catalog_indexes
SELECT i.indrelid AS oid, ic.relname AS name, pg_catalog.pg_get_indexdef(i.indexrelid) AS definition
FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace
WHERE n.nspname = ANY (%(schemas)s)
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint co WHERE co.conindid = i.indexrelid AND co.conrelid = i.indrelid)
ORDER BY i.indrelid, ic.relname;

-- name: catalog_triggers
SELECT t.tgrelid AS oid, t.tgname AS name, pg_catalog.pg_get_triggerdef(t.oid, true) AS definition
FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY (%(schemas)s) AND NOT t.tgisinternal
ORDER BY t.tgrelid, t.tgname;

-- name: catalog_policies
SELECT p.polrelid AS oid, p.polname AS name, p.polpermissive AS permissive, p.polcmd AS cmd,
       ARRAY(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r::regrole::text) END
             FROM pg_catalog.unnest(p.polroles) r ORDER BY 1) AS roles,
       pg_catalog.pg_get_expr(p.polqual, p.polrelid) AS using, pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) AS check
FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY (%(schemas)s)
ORDER BY p.polrelid, p.polname;

-- name: catalog_routines
SELECT p.oid, n.nspname AS schema, p.proname AS name, p.prokind AS kind, p.proowner AS owner,
       coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))::text[] AS acl,
       pg_catalog.pg_get_function_identity_arguments(p.oid) AS identity,
       pg_catalog.pg_get_functiondef(p.oid) AS definition,
       pg_catalog.obj_description(p.oid, 'pg_proc') AS comment
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY (%(schemas)s)
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d  -- an extension's own (dblink's): the extension stands for them
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 2, 3, 7;

-- name: catalog_event_triggers
SELECT e.evtname AS name, e.evtevent AS event, e.evtfoid::regprocedure::text AS function, e.evtenabled AS enabled,
       e.evttags AS tags
FROM pg_catalog.pg_event_trigger e JOIN pg_catalog.pg_proc p ON p.oid = e.evtfoid
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY (%(schemas)s)
ORDER BY 1;

-- name: catalog_memberships
-- Which of pgml-tuned's roles include which (roles are the cluster's: only these fixed names are the schema's)
SELECT r.rolname AS role, m.rolname AS member
FROM pg_catalog.pg_auth_members a
JOIN pg_catalog.pg_roles r ON r.oid = a.roleid JOIN pg_catalog.pg_roles m ON m.oid = a.member
WHERE r.rolname = ANY (%(roles)s) AND m.rolname = ANY (%(roles)s)
ORDER BY 1, 2;

-- name: catalog_default_acls
SELECT d.defaclrole AS owner, n.nspname AS schema, d.defaclobjtype AS kind, d.defaclacl::text[] AS acl
FROM pg_catalog.pg_default_acl d JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace
WHERE n.nspname = ANY (%(schemas)s)
ORDER BY 2, 3;

-- name: catalog_roles
-- Who is who, to print role oids by name: superusers print as <superuser>, a loopback login as its pattern.
SELECT r.oid, r.rolname AS name, r.rolsuper AS super FROM pg_catalog.pg_roles r;

-- name: catalog_reference_rows
-- The rows of one reference table, as a count and the md5 of their text in order: {row} is the row's text
-- (t::text, or ROW(the columns that do not depend on when they were written)::text), {table} the table.
SELECT pg_catalog.count(*) AS n, pg_catalog.md5(coalesce(pg_catalog.string_agg(r, E'\n' ORDER BY r), '')) AS md5
FROM (SELECT {row} AS r FROM {table} t) rows;
