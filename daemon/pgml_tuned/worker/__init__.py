"""The worker: the daemon's orchestration (daemon.py), one attempt at a job (attempt.py), the child process
handle (process.py) and the queue interface with its PostgreSQL implementation (backend.py)."""
