"""Exceptions shared by the child process, the recipes and the model loader (the bottom layer: imports nothing)."""

from __future__ import annotations


class JobError(Exception):
    """A problem with the job itself (bad input, bad hyperparams): fails the job with this message."""


class Interrupted(Exception):
    """SIGTERM arrived: the job goes back to the queue (after a checkpoint when one could be saved)."""


class LeaseLost(RuntimeError):
    """A fenced write matched no row: this attempt no longer owns the job."""
