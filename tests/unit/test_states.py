"""settle(): how an attempt ends, as a table. Each row: what is known when the child has exited → what the
worker writes."""

from __future__ import annotations

import pytest

from pgml_tuned.states import OVERTIME_ERROR, Action, Claim, ExitCode, Status, StopReason, settle
from pgml_tuned.worker.backend import Notice, parse_notice

OK, ERR, REQ, LOST = ExitCode.OK, ExitCode.ERROR, ExitCode.REQUEUE, ExitCode.LEASE_LOST
CANCEL, LEASE, DOWN = StopReason.CANCELLED, StopReason.LEASE_LOST, StopReason.SHUTDOWN
RUN, DONE = Status.RUNNING, Status.SUCCEEDED

# (exit code, stop reason, job status for this attempt, error reported, lease lost reported) → action
TABLE = [
    # the child committed: nothing can undo it, whatever else happened
    ((OK, None, DONE, False, False), Action.DONE),
    ((OK, DOWN, DONE, False, False), Action.DONE),
    ((OK, LEASE, DONE, False, False), Action.DONE),  # the heartbeat saw "not running" after the commit
    ((-9, CANCEL, DONE, False, False), Action.DONE),
    # the job is no longer this attempt's (re-claimed, reaped, already final): write nothing
    ((-9, LEASE, None, False, False), Action.ABANDON),
    ((ERR, None, None, True, False), Action.ABANDON),
    ((REQ, DOWN, Status.QUEUED, False, False), Action.ABANDON),  # reaped and requeued meanwhile
    ((ERR, None, Status.FAILED, True, False), Action.ABANDON),
    ((LOST, None, RUN, False, True), Action.ABANDON),  # the child's fenced write matched nothing
    ((-9, LEASE, RUN, False, False), Action.ABANDON),
    # cancelled by pgml.cancel()
    ((-9, CANCEL, RUN, False, False), Action.CANCEL),
    ((ERR, CANCEL, RUN, True, False), Action.CANCEL),
    # exited 0 without storing results
    ((OK, None, RUN, False, False), Action.FAIL),
    # a failure of the job itself fails it — also while the worker shuts down (requeued it would fail again)
    ((ERR, None, RUN, True, False), Action.FAIL),
    ((ERR, DOWN, RUN, True, False), Action.FAIL),
    # interrupted by the shutdown: back to the queue (resumes from its checkpoint)
    ((REQ, DOWN, RUN, False, False), Action.REQUEUE),
    ((REQ, None, RUN, False, False), Action.REQUEUE),  # SIGTERM from someone else (systemd, an operator)
    ((-9, DOWN, RUN, False, False), Action.REQUEUE),  # killed when the grace ran out
    ((-15, DOWN, RUN, False, False), Action.REQUEUE),  # SIGTERM before its handler was installed
    ((ERR, DOWN, RUN, False, False), Action.REQUEUE),  # a crash with no error of its own while stopping
    # crashes
    ((-9, None, RUN, False, False), Action.FAIL),  # the OOM killer
    ((ERR, None, RUN, False, False), Action.FAIL),  # died without reporting an error (e.g. an import crash)
    ((3, None, RUN, False, False), Action.FAIL),
    # past its max_runtime (pgml.role_limits)
    ((-9, StopReason.OVERTIME, RUN, False, False), Action.FAIL),
]


@pytest.mark.parametrize(("known", "action"), TABLE, ids=[f"{k}->{a}" for k, a in TABLE])
def test_settle(known: tuple[int, StopReason | None, Status | None, bool, bool], action: Action) -> None:
    rc, reason, status, error, lost = known
    transition = settle(rc, reason, status, error_reported=error, lease_lost_reported=lost, description="why")
    assert transition.action == action
    if action == Action.FAIL:
        expected = (
            "the training process exited without storing results"
            if rc == OK
            else OVERTIME_ERROR
            if reason == StopReason.OVERTIME
            else "why"
        )
        assert transition.error == expected
    else:
        assert transition.error is None


def test_claim_spec_never_carries_secrets() -> None:
    row = {
        "id": 1,
        "attempt": 2,
        "project_id": 3,
        "project_name": "p",
        "model_id": 4,
        "task": "noop",
        "relation_schema": None,
        "relation_table": None,
        "model_name": "m",
        "test_size": 0.25,
        "test_sampling": "random",
        "hyperparams": {},
        "secrets": "rsa1:...",
        "extra": "ignored",
    }
    claim = Claim.from_row(row)
    assert "secrets" not in claim.spec() and claim.spec()["attempt"] == 2


@pytest.mark.parametrize(
    ("channel", "payload", "notice"),
    [
        ("pgml_jobs", '{"type": "job_queued", "nonce": "5f0c…"}', Notice("job_queued")),
        ("pgml_jobs", '{"type": "job_queued", "id": 7}', Notice("job_queued")),  # an id (before issue 20): unread
        ("pgml_jobs", "7", Notice("job_queued")),  # any payload on pgml_jobs only wakes the claimer
        ("pgml_jobs", "", Notice("job_queued")),
        ("pgml_jobs", '{"type": "gang_forming"}', Notice("gang_forming")),
        ("pgml_control", '{"type": "cancel_requested"}', Notice("cancel_requested")),
        ("pgml_control", '{"type": "cancel_requested", "id": 7}', Notice("cancel_requested")),
        ("pgml_control", "cancel:7", None),  # the old untyped form: ignored
        ("pgml_control", '{"type": "shutdown"}', None),
        ("pgml_control", '["cancel_requested", 7]', None),
        ("pgml_control", '{"type": "cancel_requested", "id": "7; DROP"}', Notice("cancel_requested")),
        ("elsewhere", '{"type": "job_queued"}', None),
    ],
)
def test_notices_are_typed(channel: str, payload: str, notice: Notice | None) -> None:
    assert parse_notice(channel, payload) == notice
