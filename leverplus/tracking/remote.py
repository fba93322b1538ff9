"""A single run's MLflow run kept by a tracking worker process (``leverplus.tracking.worker``), so that opening a
sqlite store (seconds of SQLAlchemy and Alembic imports, under the GIL in a thread) runs on another core while the
data loads and the model trains.

:class:`TrackingWorker` starts the worker at the very beginning of the run and sends it requests without waiting
(a writer thread feeds its stdin, a reader thread collects its answers, in order); :class:`RemoteRun` is an
:class:`~leverplus.tracking.run.MlflowRun` whose store calls become such requests. Every value logged is built in the
training process, exactly as ``MlflowRun`` builds it (timestamps, names, batches, the owner tags of this process).
A failed request (a corrupt ``mlflow.db``, an unwritable store) is raised in the training process at its next
tracking call (the end of an epoch at the latest) or when the run ends, as the same exception; a worker that dies is
reported as such. ``flush`` and ``finish`` wait for every answer, so a finished ``RemoteRun`` is in the store.
"""

from __future__ import annotations

import logging
import pickle
import queue
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from leverplus.tracking.run import MlflowRun, run_creation_tags

log = logging.getLogger(__name__)

#: how long closing waits for the worker process to exit before it is killed
CLOSE_TIMEOUT_S = 120.0


class TrackingWorker:
    """The training process's end of one tracking worker process; starting it opens the store at ``uri``."""

    def __init__(self, uri: str) -> None:
        # a session of its own: Ctrl-C at a terminal reaches the training process only, which ends the run through it
        self.proc = subprocess.Popen([sys.executable, "-m", "leverplus.tracking.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        self._cond = threading.Condition()
        self._sent = self._answered = 0
        self._callbacks: Dict[int, Callable[[Any], None]] = {}
        self._error: Optional[BaseException] = None
        self._error_raised = False
        self._gone = self._closed = False
        self._outbox: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._writer = threading.Thread(target=self._write, args=(self._outbox,), daemon=True,
                                        name="leverplus-tracking-worker-writer")
        self._reader = threading.Thread(target=self._read, daemon=True, name="leverplus-tracking-worker-reader")
        self._writer.start()
        self._reader.start()
        self.submit(("init", uri))

    def submit(self, request: Tuple[Any, ...], on_answer: Optional[Callable[[Any], None]] = None) -> None:
        """Send ``request`` (pickled now, so later changes to its arguments do not matter); ``on_answer`` gets the
        value of a successful answer, in the reader thread."""
        if self._closed:
            raise RuntimeError("the MLflow tracking worker was already closed")
        data = pickle.dumps(request)
        with self._cond:
            if on_answer is not None:
                self._callbacks[self._sent] = on_answer
            self._sent += 1
        self._outbox.put(data)

    @property
    def error(self) -> Optional[BaseException]:
        """The first failed request's exception, if any."""
        return self._error

    def raise_error(self) -> None:
        """Raise the first failure, once."""
        with self._cond:
            if self._error is None or self._error_raised:
                return
            self._error_raised = True
        raise self._error

    def wait(self) -> None:
        """Wait until every request sent so far is answered, then :meth:`raise_error`."""
        with self._cond:
            self._cond.wait_for(lambda: self._answered >= self._sent or self._gone)
        self.raise_error()

    def wait_for(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` (checked as answers come in) or a failure, then :meth:`raise_error`."""
        with self._cond:
            self._cond.wait_for(lambda: done() or self._error is not None or self._gone)
        self.raise_error()

    def close(self) -> None:
        """End the worker: it answers what it has, then exits. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(None)
        self._writer.join()
        try:
            self.proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self.proc.stdout.close()

    def _write(self, outbox: "queue.Queue[Optional[bytes]]") -> None:
        stdin = self.proc.stdin
        while True:
            data = outbox.get()
            if data is None:
                break
            try:
                stdin.write(data)
                stdin.flush()
            except OSError:  # the worker is gone; the reader reports it
                break
        try:
            stdin.close()
        except OSError:
            pass

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    def _read(self) -> None:
        while True:
            try:
                ok, value = pickle.load(self.proc.stdout)
            except Exception:  # EOF: the worker exited (closed, or it died)
                with self._cond:
                    self._gone = True
                    if self._answered < self._sent:
                        try:
                            status = self.proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            status = None
                        self._fail(RuntimeError(f"the MLflow tracking worker process ended (exit status {status}) "
                                                "before it had logged everything; the run may be incomplete"))
                    self._cond.notify_all()
                return
            with self._cond:
                seq = self._answered
                callback = self._callbacks.pop(seq, None)
                if not ok:
                    self._fail(value)
            if ok and callback is not None:
                try:
                    callback(value)
                except Exception as e:  # noqa: BLE001 -- a callback's failure must not stop the answers
                    log.warning(f"tracking worker callback failed: {e}")
            with self._cond:
                self._answered += 1
                self._cond.notify_all()


class RemoteRun(MlflowRun):
    """An :class:`MlflowRun` whose experiment lookup, run creation and every store call are requests to a
    :class:`TrackingWorker`; nothing here waits on the store until :meth:`flush`, :meth:`finish` or the first use of
    ``run_id`` / ``experiment_id``. ``on_open(experiment_id, run_id)`` is called once the run exists."""

    def __init__(self, worker: TrackingWorker, *, uri: str, experiment: str, artifact_root: Optional[str],
                 run_name: Optional[str], tags: Mapping[str, Any], parent_run_id: Optional[str] = None,
                 on_open: Optional[Callable[[str, str], None]] = None) -> None:
        self.uri = uri
        self.worker = worker
        self.series_keys = set()
        self._info: Optional[Tuple[str, str, str]] = None
        all_tags = run_creation_tags(tags, run_name=run_name, parent_run_id=parent_run_id)  # this process owns it

        def opened(info: Tuple[str, str, str]) -> None:
            self._info = info
            if on_open is not None:
                on_open(info[0], info[1])

        worker.submit(("open", uri, experiment, artifact_root, run_name, all_tags), on_answer=opened)

    def _opened(self) -> Tuple[str, str, str]:
        self.worker.wait_for(lambda: self._info is not None)
        if self._info is None:
            raise RuntimeError("the MLflow run was not created (the tracking worker process ended)")
        return self._info

    @property
    def experiment_id(self) -> str:  # type: ignore[override]
        return self._opened()[0]

    @property
    def run_id(self) -> str:  # type: ignore[override]
        return self._opened()[1]

    @property
    def artifact_uri(self) -> str:  # type: ignore[override]
        return self._opened()[2]

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.worker.raise_error()  # a failure so far stops the run here, as a failed call would in-process
        self.worker.submit(("call", method, args, kwargs))

    _call_later = _call

    def flush(self) -> None:
        self.worker.wait()

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
            self._call("set_terminated", status)
            self.worker.wait()
        finally:
            self.worker.close()

    def _end(self, exc_type, exc, tb) -> None:
        if self._info is None and self.worker.error is not None:  # no run to end: the store never took it
            self.worker.close()
            if exc_type is None:
                self.worker.raise_error()
            return
        super()._end(exc_type, exc, tb)
