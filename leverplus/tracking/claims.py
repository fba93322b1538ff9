"""Claims on run keys, so concurrent sweep invocations (processes or machines sharing one tracking store) train each
distinct arm exactly once.

A job that is about to train opens its MLflow run (RUNNING, tagged with its run key and a heartbeat time), then looks
for other live runs of the same key: the earliest live one (start time, then run id) owns the key. Every claimant's
search runs after its own run is stored, so the later of two always sees the earlier, and both agree on the owner.
The owner trains and refreshes its heartbeat tag; the others withdraw their run (deleted) and wait until the owner's
run is FINISHED (then record it as reused), or until the owner is gone — its heartbeat older than the grace period,
or its run ended FAILED/KILLED — and then claim again. Clocks of the machines are assumed to agree to well within
the grace period."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import mlflow

from leverplus.tracking.store import with_retries

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "leverplus.heartbeat"  # seconds since the epoch, refreshed while the owner trains


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: ``owner`` is the run id that owns the key (this run when ``mine``); ``finished`` is
    set when a FINISHED run of the key exists (nothing left to train)."""

    owner: Optional[str]
    mine: bool
    finished: Optional[str] = None


def _runs_of(client: Any, experiment_id: str, key: str) -> List[Any]:
    flt = f"tags.run_key = '{key}'"
    return with_retries(lambda: client.search_runs([experiment_id], filter_string=flt, max_results=1000))


def _alive(run: Any, now: float, grace_s: float) -> bool:
    if run.info.status != "RUNNING" or run.info.lifecycle_stage != "active":
        return False
    beat = run.data.tags.get(HEARTBEAT_TAG)
    try:
        last = float(beat) if beat is not None else run.info.start_time / 1000.0
    except ValueError:
        return False
    return now - last <= grace_s


def resolve_claim(client: Any, experiment_id: str, key: str, my_run_id: str, grace_s: float,
                  now: Optional[float] = None) -> Claim:
    """Who owns ``key`` now, seen from ``my_run_id`` (a RUNNING run of the key that this job just opened)."""
    now = time.time() if now is None else now
    runs = _runs_of(client, experiment_id, key)
    done = [r for r in runs if r.info.status == "FINISHED" and r.info.lifecycle_stage == "active"]
    if done:
        first = min(done, key=lambda r: (r.info.end_time or 0, r.info.run_id))
        return Claim(owner=first.info.run_id, mine=False, finished=first.info.run_id)
    live = [r for r in runs if r.info.run_id == my_run_id or _alive(r, now, grace_s)]
    if not live:
        return Claim(owner=None, mine=False)
    owner = min(live, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    return Claim(owner=owner, mine=owner == my_run_id)


def wait_for_owner(client: Any, experiment_id: str, key: str, grace_s: float, poll_s: float,
                   timeout_s: Optional[float] = None, sleep: Callable[[float], None] = time.sleep) -> Optional[str]:
    """Wait while another live run owns ``key``. Returns the FINISHED run's id, or None when no live owner is left
    (it died, failed or was killed: claim again). A dead owner still marked RUNNING is set KILLED."""
    start = time.time()
    while True:
        now = time.time()
        runs = _runs_of(client, experiment_id, key)
        done = [r for r in runs if r.info.status == "FINISHED" and r.info.lifecycle_stage == "active"]
        if done:
            return min(done, key=lambda r: (r.info.end_time or 0, r.info.run_id)).info.run_id
        for r in runs:  # a RUNNING run whose heartbeat stopped: its worker is gone
            if r.info.status == "RUNNING" and r.info.lifecycle_stage == "active" and not _alive(r, now, grace_s):
                log.warning(f"run {r.info.run_id} of key {key} stopped sending heartbeats: KILLED, claiming again")
                with_retries(lambda: client.set_terminated(r.info.run_id, "KILLED"))
        if not any(_alive(r, now, grace_s) for r in runs):
            return None
        if timeout_s is not None and now - start > timeout_s:
            raise TimeoutError(f"run key {key} still owned by a live run after {timeout_s:.0f} s")
        sleep(poll_s)


class Heartbeat:
    """Refreshes ``HEARTBEAT_TAG`` on a run every ``interval_s`` seconds in a daemon thread (context manager)."""

    def __init__(self, uri: str, run_id: str, interval_s: float) -> None:
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id, self.interval_s = run_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="leverplus-heartbeat")

    def beat(self) -> None:
        with_retries(lambda: self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.3f}"))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 -- a missed beat is not fatal; the grace period covers it
                log.warning(f"heartbeat of run {self.run_id} failed: {e}")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def claim_or_wait(open_run: Callable[[], Any], client: Any, experiment_id: str, key: str, grace_s: float,
                  poll_s: float) -> "tuple[Optional[Any], Optional[str]]":
    """Open this job's run and claim ``key``. Returns ``(run, None)`` when this job owns the key and should train, or
    ``(None, finished_run_id)`` when another run trained it (this job's own run withdrawn). While another live run
    owns the key, waits for it; when that owner dies, claims again."""
    while True:
        run = open_run()
        claim = resolve_claim(client, experiment_id, key, run.run_id, grace_s)
        if claim.mine:
            return run, None
        with_retries(lambda: client.delete_run(run.run_id))  # withdrawn: the owner's run stands for this arm
        if claim.finished:
            return None, claim.finished
        log.info(f"run key {key} is being trained by run {claim.owner} (another invocation): waiting for it")
        finished = wait_for_owner(client, experiment_id, key, grace_s, poll_s)
        if finished:
            return None, finished
