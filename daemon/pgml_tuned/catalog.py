"""The schema as text: every object of the schemas pgml-tuned owns, printed in one normalised form.

sql/schema.sql is this text for a database that `migrate` built from nothing (scripts/schema_dump writes it); the
tests compare it with what the migrations and sql/functions make now, and with a database upgraded from the last
release. The form is made to compare, and to read:

- objects in a fixed order (schemas, extensions, relations with their columns, constraints, indexes, triggers and
  policies, then routines, event triggers, grants), each group sorted by name;
- definitions as PostgreSQL prints them (pg_get_functiondef, pg_get_viewdef, ...), so formatting in sql/ does not
  matter but every clause does;
- nothing that depends on who migrated or where: grantors are left out, a superuser's name prints as <superuser>,
  a database's loopback login (pgml_loopback_<database oid>) as pgml_loopback_<database>;
- what a database holds at run time is left out (a job's table in pgml_rows, a load's in pgml_staging, datasets,
  prediction tables); the contents of the reference tables (tasks, training_arg_types, schema_migrations) are in,
  as a count and an md5.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import psycopg
from psycopg import sql

from .db import q

SCHEMAS = ["pgml", "pgml_rows", "pgml_staging", "pgml_dblink"]
ROLES = ["pgml_owner", "pgml_user", "pgml_worker", "pgml_admin", "pgml_child", "pgml_loopback", "pgml_serving"]
# the rows the migrations and sql/functions write, by the columns that do not depend on when they ran
REFERENCE_TABLES = {"pgml.schema_migrations": ["version"], "pgml.tasks": ["*"], "pgml.training_arg_types": ["*"]}
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")
_LOOPBACK = re.compile(r"\bpgml_loopback_[0-9]+\b")

# aclitem letters (PostgreSQL's acl.h) → privilege names
_PRIVILEGES = {
    "r": "SELECT", "w": "UPDATE", "a": "INSERT", "d": "DELETE", "D": "TRUNCATE", "x": "REFERENCES", "t": "TRIGGER",
    "X": "EXECUTE", "U": "USAGE", "C": "CREATE", "c": "CONNECT", "T": "TEMPORARY", "s": "SET", "A": "ALTER SYSTEM",
    "m": "MAINTAIN",
}  # fmt: skip
_RELKINDS = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE", "f": "FOREIGN TABLE"}
_POLICY_CMDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


class _Names:
    """Role names as the dump prints them."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.by_oid = {r["oid"]: self._name(r["name"], r["super"]) for r in rows}
        self.by_name = {r["name"]: self._name(r["name"], r["super"]) for r in rows}

    @staticmethod
    def _name(name: str, superuser: bool) -> str:
        if superuser:
            return "<superuser>"
        return _LOOPBACK.sub("pgml_loopback_<database>", name)

    def role(self, ident: str) -> str:
        """An aclitem's grantee: '' is PUBLIC; a quoted name is unquoted first."""
        if ident == "":
            return "PUBLIC"
        name = ident[1:-1].replace('""', '"') if ident.startswith('"') else ident
        return self.by_name.get(name, name)


def _grants(acl: list[str] | None, on: str, names: _Names, owner: str | None = None) -> list[str]:
    """GRANT lines for an aclitem[] (grantors left out; the owner's own rights too, as they are implied)."""
    lines = []
    for item in acl or []:
        grantee, _, rest = item.rpartition("=")
        privs, _, _grantor = rest.partition("/")
        who = names.role(grantee)
        if owner is not None and who == owner:
            continue
        plain = [_PRIVILEGES[c] for i, c in enumerate(privs) if c != "*" and privs[i + 1 : i + 2] != "*"]
        granted = [_PRIVILEGES[c] for i, c in enumerate(privs) if c != "*" and privs[i + 1 : i + 2] == "*"]
        if plain:
            lines.append(f"GRANT {', '.join(sorted(plain))} ON {on} TO {who};")
        if granted:
            lines.append(f"GRANT {', '.join(sorted(granted))} ON {on} TO {who} WITH GRANT OPTION;")
    return sorted(lines)


def _ident(name: str) -> str:
    """A column's name, quoted only where it must be (as PostgreSQL prints it), keywords aside."""
    return name if _PLAIN.match(name) else '"' + name.replace('"', '""') + '"'


def _rows(conn: psycopg.Connection[Any], name: str, **params: Any) -> list[dict[str, Any]]:
    params = {"schemas": SCHEMAS, "roles": ROLES, **params}
    return [dict(r) for r in conn.execute(q(name, file="catalog.sql"), params).fetchall()]


def _comment(on: str, text: str | None) -> list[str]:
    return [f"COMMENT ON {on} IS {sql.quote(text)};"] if text else []


def dump(conn: psycopg.Connection[Any]) -> str:
    """The schema of the database `conn` is connected to, as normalised text (a connection with dict rows)."""
    names = _Names([dict(r) for r in conn.execute(q("catalog_roles", file="catalog.sql")).fetchall()])
    out: list[str] = [
        "-- The schema pgml-tuned makes: written by scripts/schema_dump, checked by tests/integration/test_schema.py.",
        "-- Read it; change sql/migrations and sql/functions, never this file.",
    ]

    def section(title: str) -> None:
        out.extend(["", f"-- ==== {title} ====", ""])

    section("schemas")
    for s in _rows(conn, "catalog_schemas"):
        out.append(f"CREATE SCHEMA {s['name']};  -- owner {names.by_oid[s['owner']]}")
        out += _comment(f"SCHEMA {s['name']}", s["comment"])
    section("extensions")
    for e in _rows(conn, "catalog_extensions"):
        out.append(f"CREATE EXTENSION {e['name']} SCHEMA {e['schema']};")

    relations = _rows(conn, "catalog_relations")
    oids = {r["oid"]: f"{r['schema']}.{r['name']}" for r in relations}
    per_rel: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for what in ("columns", "constraints", "indexes", "triggers", "policies"):
        grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in _rows(conn, f"catalog_{what}"):
            if row["oid"] in oids:
                grouped[row["oid"]].append(row)
        per_rel[what] = grouped

    section("tables, views and sequences")
    for r in relations:
        out += _relation(r, per_rel, names)

    section("functions and procedures")
    for f in _rows(conn, "catalog_routines"):
        kind = "PROCEDURE" if f["kind"] == "p" else "FUNCTION"
        sig = f"{f['schema']}.{f['name']}({f['identity']})"
        out.append(f"-- {kind} {sig}, owner {names.by_oid[f['owner']]}")
        out.append(_LOOPBACK.sub("pgml_loopback_<database>", f["definition"].strip()) + ";")
        out += _comment(f"{kind} {sig}", f["comment"])
        out += _grants(f["acl"], f"{kind} {sig}", names, names.by_oid[f["owner"]])
        out.append("")

    section("event triggers")
    for e in _rows(conn, "catalog_event_triggers"):
        tags = f" WHEN TAG IN ({', '.join(sql.quote(t) for t in e['tags'])})" if e["tags"] else ""
        out.append(f"CREATE EVENT TRIGGER {e['name']} ON {e['event']}{tags} EXECUTE FUNCTION {e['function']};"
                   f"  -- enabled: {e['enabled']}")  # fmt: skip

    section("roles that include other roles")
    for m in _rows(conn, "catalog_memberships"):
        out.append(f"GRANT {m['role']} TO {m['member']};")

    section("grants on schemas, default privileges")
    for s in _rows(conn, "catalog_schemas"):
        out += _grants(s["acl"], f"SCHEMA {s['name']}", names, names.by_oid[s["owner"]])
    for d in _rows(conn, "catalog_default_acls"):
        out.append(f"-- default privileges of {names.by_oid[d['owner']]} in schema {d['schema']} on kind {d['kind']}:")
        out += _grants(d["acl"], f"new objects of kind {d['kind']}", names)

    section("reference data (rows the migrations and functions write): count and md5 of the rows in key order")
    for table, columns in REFERENCE_TABLES.items():
        row_text = (
            sql.SQL("t::text")
            if columns == ["*"]
            else sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier("t", c) for c in columns))
        )
        query = sql.SQL(q("catalog_reference_rows", file="catalog.sql")).format(
            row=row_text, table=sql.Identifier(*table.split("."))
        )
        counted = conn.execute(query).fetchone()
        assert counted is not None
        out.append(f"-- {table}: {counted['n']} rows, md5 {counted['md5']}")
    return "\n".join(out).rstrip() + "\n"


# the top-level FROM of a pretty-printed view over one relation: "   FROM pgml.workers w" alone on its line
_SINGLE_FROM = re.compile(r"^   FROM [\w.]+ (\w+)$(?!\n\s+(?:JOIN|LEFT|RIGHT|FULL|CROSS)\b)", re.M)


def _view(definition: str) -> str:
    """A view's definition, the same on every major: PostgreSQL 16+ no longer qualifies the columns of a query level
    over one relation with its alias (`w.id` is printed `id`), so for a view over one relation that alias is dropped
    on every major."""
    text = definition.rstrip().rstrip(";")
    if m := _SINGLE_FROM.search(text):
        text = re.sub(rf"\b{m.group(1)}\.(?=[a-z_\"])", "", text)
    return text


def _relation(r: dict[str, Any], per_rel: dict[str, dict[int, list[dict[str, Any]]]], names: _Names) -> list[str]:
    name = f"{r['schema']}.{r['name']}"
    kind = _RELKINDS[r["kind"]]
    owner = names.by_oid[r["owner"]]
    out = [f"-- {kind.lower()} {name}, owner {owner}"]
    if r["kind"] == "S":
        owned = f" OWNED BY {r['owned_by']}" if r["owned_by"] else ""
        out.append(
            f"CREATE SEQUENCE {name} AS {r['seq_type']} START {r['seq_start']} INCREMENT {r['seq_increment']} "
            f"MINVALUE {r['seq_min']} MAXVALUE {r['seq_max']} CACHE {r['seq_cache']}"
            f"{' CYCLE' if r['seq_cycle'] else ''}{owned};"
        )
    elif r["kind"] in ("v", "m"):
        options = f" WITH ({', '.join(r['options'])})" if r["options"] else ""
        out.append(f"CREATE {kind} {name}{options} AS\n{_view(r['view'])};")
    else:
        cols = []
        for c in per_rel["columns"].get(r["oid"], []):
            col = f"    {_ident(c['name'])} {c['type']}"
            if c["collation"]:
                col += f' COLLATE "{c["collation"]}"'
            if c["identity"]:
                col += " GENERATED " + ("ALWAYS" if c["identity"] == "a" else "BY DEFAULT") + " AS IDENTITY"
            elif c["generated"]:
                col += f" GENERATED ALWAYS AS ({c['default']}) STORED"
            elif c["default"] is not None:
                col += f" DEFAULT {c['default']}"
            if c["not_null"]:
                col += " NOT NULL"
            cols.append(col)
        cons = [f"    CONSTRAINT {x['name']} {x['definition']}" for x in per_rel["constraints"].get(r["oid"], [])]
        part = f" PARTITION BY {r['partition_key']}" if r["partition_key"] else ""
        options = f" WITH ({', '.join(r['options'])})" if r["options"] else ""
        out.append(f"CREATE {kind} {name} (\n" + ",\n".join(cols + cons) + f"\n){part}{options};")
        if r["rls"]:
            out.append(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY;")
        if r["force_rls"]:
            out.append(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY;")
    out += _comment(f"{'TABLE' if kind == 'TABLE' else kind} {name}", r["comment"])
    for c in per_rel["columns"].get(r["oid"], []):
        out += _comment(f"COLUMN {name}.{_ident(c['name'])}", c["comment"])
        out += _grants(c["acl"], f"{name} ({_ident(c['name'])})", names, owner)
    out += [x["definition"] + ";" for x in per_rel["indexes"].get(r["oid"], [])]
    out += [x["definition"] + ";" for x in per_rel["triggers"].get(r["oid"], [])]
    for p in per_rel["policies"].get(r["oid"], []):
        line = f"CREATE POLICY {p['name']} ON {name}" + ("" if p["permissive"] else " AS RESTRICTIVE")
        line += f" FOR {_POLICY_CMDS[p['cmd']]} TO {', '.join(names.role(x) for x in p['roles'])}"
        if p["using"] is not None:
            line += f"\n    USING ({p['using']})"
        if p["check"] is not None:
            line += f"\n    WITH CHECK ({p['check']})"
        out.append(line + ";")
    out += _grants(r["acl"], f"{kind} {name}", names, owner)
    out.append("")
    return out
