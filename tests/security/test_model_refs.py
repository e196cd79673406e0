"""Model references resolve only through the API's rules (issue 20, classes 1 and 3): a hub id (allow-list and
private-model ledger checked for the requester on every use, warm in the serving cache or not), a `pgml:` ref the
requester may read, or a directory under the administrators' model directories (PGML_MODEL_DIRS), never the
worker's own state (its home, scratch, the serving lane's model cache, the Hugging Face cache).

One table of (role × reference) → allowed / refused, run on three paths with a real database: tune (models.resolve,
as a training child calls it, with the job's token), transform / embed / rank (the serving process's key_for +
model, one Server whose warm cache every role shares, for each kind of request) and predict_batch / embed_batch
(cache.load, as their recipes call it). Then the two attacks
end to end, with a daemon: bob's model served once and taken by its cache directory (class 1), and a warm hub
model served to a second user after the allow-list or the ledger refused it (class 3).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgml_tuned import hub_access, hub_cache, model_refs, models
from pgml_tuned.db import Pool
from pgml_tuned.errors import JobError
from pgml_tuned.serving import cache
from pgml_tuned.serving.requests import Request
from pgml_tuned.serving.server import Server, ServingConfig
from tests.conftest import ADMIN, OTHER_USER, USER, wait_for, wait_job, wait_serving
from tests.support import models as testing
from tests.support.stored import add_model

Conn = psycopg.Connection[dict[str, Any]]
ROLES = (USER, OTHER_USER, ADMIN)
RUN = uuid.uuid4().hex[:8]  # hub ids of this run: the session's hub cache and ledger are shared
ALLOWED, REFUSED, PRIVATE = f"refs-{RUN}/allowed", f"refs-{RUN}/refused", f"refs-{RUN}/private"
TOKEN = "hf_bobs_reader_0123456789"  # the other user's: it fetched PRIVATE

# ---- the table ----
OK = None
NO_MODEL = "there is no"
LIST = "is not on the allow-list"
PRIV = "is private on this worker"
STATE = "lies in the worker's"
HF_CACHE = "lies in the worker's Hugging Face cache"
OUTSIDE = "not in the workers' model directories"
RELATIVE = "is not an absolute path"

# reference → what (user, other user, admin) get: allowed (OK) or refused with that message
TABLE: dict[str, tuple[str | None, str | None, str | None]] = {
    "own pgml:project": (OK, OK, OK),
    "other's pgml:project": (NO_MODEL, NO_MODEL, OK),
    "other's pgml:model:id": (NO_MODEL, NO_MODEL, OK),
    "allowed hub id": (OK, OK, OK),
    "hub id off the allow-list": (LIST, LIST, LIST),
    "private hub model fetched with the other user's token": (PRIV, PRIV, PRIV),
    "hub cache directory of that private model": (HF_CACHE, HF_CACHE, HF_CACHE),
    "serving cache directory of another user's model": (STATE, STATE, STATE),
    "worker's scratch directory": (STATE, STATE, STATE),
    "directory in the admin's list": (OK, OK, OK),
    "directory outside the list": (OUTSIDE, OUTSIDE, OUTSIDE),
    "symlink in a listed directory into the worker's state": (STATE, STATE, STATE),
    "'..' out of a listed directory": (OUTSIDE, OUTSIDE, OUTSIDE),
    "relative path": (RELATIVE, RELATIVE, RELATIVE),
    "'~' path": (RELATIVE, RELATIVE, RELATIVE),
}
# the one difference between paths: a training job carries its submitter's hub token (the serving lane and
# predict_batch have none), so the token that fetched the private model reads it there
TUNE_WITH_TOKEN = {("private hub model fetched with the other user's token", OTHER_USER): OK}


def expected(ref: str, role: str, path: str) -> str | None:
    if path == "tune" and (ref, role) in TUNE_WITH_TOKEN:
        return TUNE_WITH_TOKEN[(ref, role)]
    return TABLE[ref][ROLES.index(role)]


def check(path: str, ref: str, role: str, name: str, attempt: Callable[[], Any], wrong: list[str]) -> None:
    want = expected(ref, role, path)
    try:
        attempt()
    except JobError as e:
        if want is None or want not in str(e):
            wrong.append(f"{path} {role} {ref} ({name}): refused ({e}), expected {want or 'allowed'}")
        return
    if want is not None:
        wrong.append(f"{path} {role} {ref} ({name}): allowed, expected refused with {want!r}")


# ---- the world: models, the worker's state, the administrator's directory ----
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("refs-models") / "bert", hidden=32, layers=1)


class World:
    def __init__(self, root: Path, outside: Path, snapshot: Path, ids: dict[str, int]) -> None:
        self.root, self.outside, self.snapshot, self.ids = root, outside, snapshot, ids
        self.home = root / "home"  # the worker's state, inside the listed directory (an admin listed its parent)
        self.serving_models = self.home / "work" / "serving" / "models"

    def other(self, role: str) -> str:
        return USER if role != USER else OTHER_USER

    def name(self, ref: str, role: str) -> str:
        other = self.other(role)
        return {
            "own pgml:project": f"pgml:proj_{role}",
            "other's pgml:project": f"pgml:proj_{other}",
            "other's pgml:model:id": f"pgml:model:{self.ids[other]}",
            "allowed hub id": ALLOWED,
            "hub id off the allow-list": REFUSED,
            "private hub model fetched with the other user's token": PRIVATE,
            "hub cache directory of that private model": str(self.snapshot),
            "serving cache directory of another user's model": str(
                self.serving_models / f"start-model-{self.ids[other]}"
            ),
            "worker's scratch directory": str(self.home / "work" / "job7-a1-x" / f"start-model-{self.ids[other]}"),
            "directory in the admin's list": str(self.root / "models" / "bert"),
            "directory outside the list": str(self.outside / "bert"),
            "symlink in a listed directory into the worker's state": str(self.root / "models" / "escape"),
            "'..' out of a listed directory": str(self.root / "models" / ".." / ".." / self.outside.name / "bert"),
            "relative path": "./models/bert",
            "'~' path": "~/bert",
        }[ref]


@pytest.fixture
def world(
    su: Conn, ops: Conn, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_dsn: str
) -> Iterator[World]:
    from huggingface_hub import constants

    ids = {role: add_model(su, role, f"proj_{role}", "text-classification", path=tiny) for role in ROLES}
    # a pending request of the administrator's: the serving lane's download of stored files needs one (any model)
    ops.execute(
        "SELECT pgml._request_submit(%s, 'classify', %s, '{}', %s)", (ADMIN, f"pgml:proj_{ADMIN}", Jsonb(["x"]))
    )
    for pattern in (ALLOWED, PRIVATE):
        ops.execute("SELECT pgml.hub_allow(%s)", (pattern,))
    hf_home = Path(constants.HF_HOME)
    for hub_id in (ALLOWED, REFUSED):
        hub_cache.add(tiny, hub_id, hf_home)
    snapshot = hub_cache.add(tiny, PRIVATE, hf_home).snapshot
    hub_access.record_private(PRIVATE, TOKEN, hf_home=hf_home)  # what a job fetching it with bob's token records

    root, outside = tmp_path / "listed", tmp_path / "outside"
    w = World(root, outside, snapshot, ids)
    shutil.copytree(tiny, root / "models" / "bert")
    shutil.copytree(tiny, outside / "bert")
    # what the worker's state holds after serving and training other users' models
    store = cache.SyncStore(worker_dsn, w.serving_models)
    for role in ROLES:
        store.download_model(ids[role], w.serving_models / f"start-model-{ids[role]}")
        shutil.copytree(tiny, w.home / "work" / "job7-a1-x" / f"start-model-{ids[role]}")
    (root / "models" / "escape").symlink_to(w.serving_models / f"start-model-{ids[OTHER_USER]}")
    monkeypatch.setenv("PGML_MODEL_DIRS", str(root))
    monkeypatch.setenv("PGML_STATE_IDS", model_refs.identities([w.home]))
    monkeypatch.chdir(root)  # './models/bert' exists relative to the process: still refused
    yield w


def note(*args: Any, **kwargs: Any) -> None:
    pass


# ---- the table on each path ----
def test_tune_resolves_only_what_the_rules_allow(world: World, worker_dsn: str, tmp_path: Path) -> None:
    """models.resolve as a training child calls it (every recipe, every restart), with the job's own token."""
    store = cache.SyncStore(worker_dsn, tmp_path / "tune")
    wrong: list[str] = []
    for role in ROLES:
        token = TOKEN if role == OTHER_USER else None
        for ref in TABLE:
            name = world.name(ref, role)
            workdir = tmp_path / "tune" / role
            workdir.mkdir(parents=True, exist_ok=True)
            check(
                "tune",
                ref,
                role,
                name,
                functools.partial(models.resolve, name, store, workdir, note, token=token, owner=role),
                wrong,
            )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("job", "family"), [("predict_batch", cache.CLASSIFY), ("embed_batch", cache.EMBED)])
def test_batch_jobs_load_only_what_the_rules_allow(
    world: World, worker_dsn: str, tmp_path: Path, job: str, family: str
) -> None:
    """cache.load as the predict_batch and embed_batch recipes call it (no hub token)."""
    store = cache.SyncStore(worker_dsn, tmp_path / "batch")
    wrong: list[str] = []
    for role in ROLES:
        for ref in TABLE:
            name = world.name(ref, role)
            key = cache.ModelKey(family, name, role)
            load = functools.partial(cache.load, key, store, tmp_path / "batch")
            check(job, ref, role, name, load, wrong)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("kind", ["classify", "embed", "rank"])  # pgml.transform, pgml.embed, pgml.rank
def test_requests_serve_only_what_the_rules_allow_warm_or_not(
    world: World, worker_dsn: str, tmp_path: Path, kind: str
) -> None:
    """The serving process's own steps for each request (key_for, then the cached or loaded model), one Server for
    every role: what one role warmed is in the cache when the next asks, and each is checked for itself."""
    wrong: list[str] = []

    async def run() -> None:
        pool = Pool(worker_dsn, app="test refs", max_size=2)
        server = Server(ServingConfig(dsn=worker_dsn, serving_id="refs", cache_dir=tmp_path / "serving"), pool)
        try:
            for role in (ADMIN, OTHER_USER, USER):  # the administrator warms everything it may first
                for ref in TABLE:
                    name = world.name(ref, role)
                    request = Request(0, role, kind, name, {}, ["x", "y"], False, 1)
                    try:
                        key = await server.key_for(request)
                        await server.model(key)
                        error: JobError | None = None
                    except JobError as e:
                        error = e

                    def outcome(error: JobError | None = error) -> None:
                        if error is not None:
                            raise error

                    check(kind, ref, role, name, outcome, wrong)
        finally:
            await server.requests.close()
            await pool.close()

    anyio.run(run)
    assert not wrong, "\n".join(wrong)


# ---- the attacks, end to end ----
def submit(ops: Conn, who: str, model: str) -> int:
    row = ops.execute(
        "SELECT pgml._request_submit(%s, 'classify', %s, '{}', %s) AS id", (who, model, Jsonb(["a fine film"]))
    ).fetchone()
    assert row is not None
    return int(row["id"])


def answer(ops: Conn, request_id: int) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        row = ops.execute("SELECT * FROM pgml._request_answer(%s)", (request_id,)).fetchone()
        assert row is not None
        return row if row["status"] in ("done", "failed") else None

    return wait_for(finished, 90, interval=0.01, what=f"the answer to request {request_id}")


def serving(daemon: Any, su: Conn, **kwargs: Any) -> Any:
    d = daemon(**kwargs)
    wait_serving(su)
    return d


def test_a_served_model_cannot_be_taken_by_its_cache_directory(
    conn: Conn, su: Conn, ops: Conn, daemon: Any, tmp_path: Path, tiny: Path
) -> None:
    """Class 1: bob's model is served once (its files now in the serving lane's cache under the worker's home);
    alice names that directory to pgml.transform and to pgml.tune (learning rate 0: bob's weights under her
    name). Both are refused, saying why and what to use instead; she gets no model."""
    bobs = add_model(su, OTHER_USER, "bobs", "text-classification", path=tiny)
    serving(daemon, su)
    served = answer(ops, submit(ops, OTHER_USER, f"pgml:model:{bobs}"))
    assert served["status"] == "done", served["error"]
    cached = tmp_path / "work" / "serving" / "models" / f"start-model-{bobs}"
    assert (cached / "config.json").is_file()

    taken = answer(ops, submit(ops, USER, str(cached)))
    assert taken["status"] == "failed", "alice was served bob's model by its cache directory"
    assert f"model_name '{cached}' lies in the worker's" in taken["error"]
    assert "pgml:<project> or pgml:model:<id>" in taken["error"]

    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 8) i")
    hp = {
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "training_args": {"max_steps": 1, "learning_rate": 1e-9},
    }
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('copy', task => 'text-classification', relation_name => 'public.reviews', "
        "model_name => %s, hyperparams => %s::jsonb)",
        (str(cached), json.dumps(hp)),
    ).fetchone()["job_id"]
    row = wait_job(conn, job, 120)
    assert row["status"] == "failed", "alice tuned from bob's cached model"
    assert "lies in the worker's" in row["error"]
    assert conn.execute("SELECT count(*) AS n FROM pgml.models WHERE status = 'successful'").fetchone() == {"n": 0}


def test_a_warm_hub_model_is_checked_for_every_submitter(
    su: Conn, ops: Conn, daemon: Any, tmp_path: Path, tiny: Path
) -> None:
    """Class 3: bob's requests warm two hub models. Then the worker's ledger learns the first is private (a job
    fetched it with a token) and the administrators take the second off the allow-list: alice's requests for
    them, served from the warm cache until now, are refused as a cold load would be; and naming the private one
    by its hub cache directory is refused too."""
    hf_home = tmp_path / "hf"
    private, public = f"refs-{RUN}/soon-private", f"refs-{RUN}/soon-disallowed"
    snapshot = hub_cache.add(tiny, private, hf_home).snapshot
    hub_cache.add(tiny, public, hf_home)
    for pattern in (private, public, "refs-other/*"):
        ops.execute("SELECT pgml.hub_allow(%s)", (pattern,))
    serving(daemon, su, env={"HF_HOME": str(hf_home)})
    for model in (private, public):
        got = answer(ops, submit(ops, OTHER_USER, model))
        assert got["status"] == "done", got["error"]

    hub_access.record_private(private, TOKEN, hf_home=hf_home)
    ops.execute("SELECT pgml.hub_disallow(%s)", (public,))

    got = answer(ops, submit(ops, USER, private))
    assert got["status"] == "failed", "alice was served a private model warm in the cache"
    assert f"model '{private}' is private on this worker" in got["error"]
    got = answer(ops, submit(ops, USER, public))
    assert got["status"] == "failed", "alice was served a warm model the allow-list refuses"
    assert f"hub model '{public}' is not on the allow-list" in got["error"]
    got = answer(ops, submit(ops, USER, str(snapshot)))
    assert got["status"] == "failed", "alice loaded a private model by its hub cache directory"
    assert "lies in the worker's Hugging Face cache" in got["error"]
    assert os.path.isdir(snapshot)


# ---- the setting ----
def test_the_model_dirs_setting_reaches_children_and_never_lists_the_workers_state(tmp_path: Path) -> None:
    from pgml_tuned.config import Settings
    from pgml_tuned.worker.daemon import job_env

    home = tmp_path / "home"
    s = Settings.from_env({"PGML_HOME": str(home), "PGML_MODEL_DIRS": f"/srv/models{os.pathsep}{tmp_path}"})
    assert s.model_dir_list == [Path("/srv/models"), tmp_path]  # a parent of the state is allowed: below, refused
    env = job_env(s, None)
    assert env["PGML_MODEL_DIRS"].split(os.pathsep) == ["/srv/models", str(tmp_path)]
    (home / "work").mkdir(parents=True)
    st = os.stat(home / "work")
    assert f"{st.st_dev}:{st.st_ino}" in model_refs.identities(s.state_dirs).split(",")
    assert str(home) not in env["PGML_STATE_IDS"]  # a child learns no path of the worker's state
    assert Settings.from_env({"PGML_HOME": str(home)}).model_dir_list == []  # empty by default
    with pytest.raises(ValueError, match="'models' is not an absolute path"):
        Settings.from_env({"PGML_HOME": str(home), "PGML_MODEL_DIRS": "models"})
    with pytest.raises(ValueError, match="lies in the worker's own state"):
        Settings.from_env({"PGML_HOME": str(home), "PGML_MODEL_DIRS": str(home / "work" / "serving")})


def test_a_name_that_is_no_reference_is_refused() -> None:
    from pgml_tuned import model_refs

    assert model_refs.kind("org/name") == model_refs.HUB and model_refs.kind("gpt2") == model_refs.HUB
    assert model_refs.kind("pgml:model:3") == model_refs.STORED and model_refs.kind("/x") == model_refs.DIRECTORY
    for bad in ("a/b/c", "org/../x", "x y", "org--x/y", ""):
        with pytest.raises(JobError, match="is not a model reference"):
            model_refs.kind(bad)
