"""Whether a request's submitter may use the model it names: the checks a cold load makes (models.resolve), made
for every request, warm model or not.

The serving cache keys a hub model by its id and a directory by its real path, whoever loaded it first. So before
a request is grouped with others and answered, its own submitter passes
- for a hub id: the administrators' allow-list (pgml._hub_refusal, asked as the submitter) and the worker's
  private-model ledger (hub_access.check_cached_access: the serving lane has no hub token, so a model the ledger
  says is private is served to nobody, warm or not);
- for a stored model (pgml:model:<id>, already found for the submitter by key_for): the allow-list of the hub
  model it loads onto (the same function follows stored adapters to their base);
- for a directory: model_refs.model_dir (in the administrators' model directories, not in the worker's state),
  checked again for every request (a symlink may have moved).

Decisions are cached for DECISION_SECONDS (the allow-list per submitter and name, the ledger per name): a busy
model costs one database round trip per submitter every few seconds, not one per request; a change of the
allow-list or the ledger reaches warm models within that time. An online worker asks the hub itself (no token:
the same answer for every submitter) once a minute per warm model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import anyio

from .. import hub_access, model_refs
from ..db import Pool, q
from ..errors import JobError

DECISION_SECONDS = 2.0
ONLINE_SECONDS = 60.0  # an online worker's hub check (auth_check) of a warm model: a request to the hub
MAX_DECISIONS = 4096


class Admission:
    def __init__(self, pool: Pool, places: model_refs.Places, *, seconds: float = DECISION_SECONDS) -> None:
        self.pool = pool
        self.places = places
        self.seconds = seconds
        self.decisions: dict[tuple[str, str], tuple[float, str | None]] = {}

    def directory(self, model_name: str) -> str:
        """The real path a directory reference names, if the submitter may load it (the rules do not depend on who
        asks: only the administrators' directories, never the worker's state)."""
        return str(model_refs.model_dir(model_name, self.places))

    async def check(self, name: str, owner: str) -> None:
        """Raise the JobError a cold load would raise for `owner` (a hub id or pgml:model:<id>)."""
        await self._decided((owner, name), self.seconds, lambda: self._allow_list(name, owner))
        if model_refs.kind(name) == model_refs.HUB:
            await self.check_private((name,))

    async def check_private(self, hub_ids: tuple[str, ...]) -> None:
        """The ledger (offline) or the hub (online) for hub models, asked with no token as at a load: the same for
        every submitter. Online it is a request to the hub, kept longer."""
        seconds = self.seconds if hub_access.hub_offline() else ONLINE_SECONDS
        for hub_id in hub_ids:
            await self._decided(("", hub_id), seconds, functools.partial(self._private, hub_id))

    async def _decided(self, key: tuple[str, str], seconds: float, decide: Callable[[], Awaitable[str | None]]) -> None:
        now = time.monotonic()
        decided = self.decisions.get(key)
        if decided is None or decided[0] < now:
            decided = (now + seconds, await decide())
            if len(self.decisions) >= MAX_DECISIONS:
                self.decisions = {k: v for k, v in self.decisions.items() if v[0] >= now}
            self.decisions[key] = decided
        if decided[1] is not None:
            raise JobError(decided[1])

    async def _allow_list(self, name: str, owner: str) -> str | None:
        rows = await self.pool.fetch(q("hub_refusal"), {"model_name": name, "owner": owner})
        return str(rows[0]["error"]) if rows and rows[0]["error"] else None

    async def _private(self, hub_id: str) -> str | None:
        try:
            await anyio.to_thread.run_sync(hub_access.check_cached_access, hub_id, None)
        except JobError as e:
            return str(e)
        return None
