"""The worker: the daemon's orchestration (daemon.py), one attempt at a job (attempt.py), the child process
handle (process.py), the heartbeat (heartbeat.py), the fleet registry and herd control (fleet.py), and the queue
interface (backend.py) with its PostgreSQL implementation (pg.py)."""
