"""The tracking worker process: one run's MLflow store calls, made in a process of their own.

``python -m leverplus.tracking.worker`` reads requests from stdin and answers each on stdout, in order (pickled
tuples; see ``leverplus.tracking.remote`` for the side that starts it). A request is ``("init", uri)`` (open the
store: import MLflow's SQL store, check the schema, report a corrupt file), ``("open", uri, experiment,
artifact_root, run_name, tags)`` (find or create the experiment, create the run; answers ``(experiment_id, run_id,
artifact_uri)``) or ``("call", method, args, kwargs)`` (``MlflowClient.<method>(run_id, *args, **kwargs)`` on the
opened run, retried while sqlite is locked). An answer is ``(True, value)`` or ``(False, exception)``. The worker
imports neither torch nor the training code, so it is ready in about the time MLflow takes to import, while the
training process loads its data and trains on the other core. It ignores SIGINT and SIGTERM (the training process
ends the run KILLED through it) and exits as soon as its stdin closes, also when the training process died.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from functools import partial
from typing import Any, BinaryIO, Optional, Tuple

import mlflow

from leverplus.tracking.store import get_or_create_experiment, init_store, with_retries


class _Worker:
    def __init__(self) -> None:
        self.client: Optional[Any] = None
        self.run_id: Optional[str] = None

    def handle(self, request: Tuple[Any, ...]) -> Any:
        op = request[0]
        if op == "init":
            init_store(request[1])
            return None
        if op == "open":
            _, uri, experiment, artifact_root, run_name, tags = request
            exp_id = get_or_create_experiment(experiment, uri, artifact_root)
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            run = with_retries(lambda: self.client.create_run(exp_id, tags=tags, run_name=run_name))
            self.run_id = run.info.run_id
            return exp_id, run.info.run_id, run.info.artifact_uri
        if op == "call":
            if self.run_id is None:
                raise RuntimeError("the tracking worker has no open run (opening it failed)")
            _, method, args, kwargs = request
            return with_retries(partial(getattr(self.client, method), self.run_id, *args, **kwargs))
        raise ValueError(f"unknown tracking worker request {op!r}")


def _answer(out: BinaryIO, ok: bool, value: Any) -> None:
    try:
        data = pickle.dumps((ok, value))
    except Exception:  # an exception or value that does not pickle: its text
        data = pickle.dumps((ok, RuntimeError(f"{type(value).__name__}: {value}") if not ok else None))
    out.write(data)
    out.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer requests from ``inp`` on ``out`` until ``inp`` ends."""
    worker = _Worker()
    while True:
        try:
            request = pickle.load(inp)
        except EOFError:
            return
        try:
            _answer(out, True, worker.handle(request))
        except Exception as e:  # noqa: BLE001 -- every failure goes back to the training process, which raises it
            _answer(out, False, e)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the answers' own channel
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr, not into the answers
    serve(sys.stdin.buffer, out)
    out.close()
    # every request is answered and committed: skip the interpreter's teardown of MLflow and SQLAlchemy (over half a
    # second the training process would wait for)
    os._exit(0)


if __name__ == "__main__":
    main()
