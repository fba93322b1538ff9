"""Runs whose process is gone: which process owns a RUNNING run, and closing a killed sweep's leftovers as KILLED.

Every run records the host and process id that created it (tags ``leverplus.host`` / ``leverplus.pid``). A RUNNING
run is dead when it was created on this host by a process that no longer exists, or by this very process before
(the rule the Optuna sweeper applies to its trials, ``leverplus.tracking.trials.is_stale``); runs from another host
are assumed alive. A run without these tags (a reused-run record) is dead when its parent run is dead or closed.
Also: the MLflow UI address of a run, for the console.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, Optional, Set

import mlflow

from leverplus.tracking.store import with_retries
from leverplus.utils import pid_alive

HOST_TAG, PID_TAG = "leverplus.host", "leverplus.pid"
#: the ``error`` tag of a run closed because its process was gone
DEAD_RUN_REASON = "killed: its process was gone when the sweep was started again"


def process_tags() -> Dict[str, str]:
    """The tags saying which process owns a run."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def owner_is_dead(tags: Dict[str, str], host: Optional[str] = None, my_pid: Optional[int] = None) -> Optional[bool]:
    """True/False from the run's owner tags; None when the run has none."""
    t_host, t_pid = tags.get(HOST_TAG), tags.get(PID_TAG)
    if not t_host or not t_pid or not t_pid.isdigit():
        return None
    if t_host != (host or socket.gethostname()):
        return False  # another machine: cannot tell, assume alive
    pid = int(t_pid)
    return pid == (os.getpid() if my_pid is None else my_pid) or not pid_alive(pid)


def dead_runs(runs: List[Any], host: Optional[str] = None, my_pid: Optional[int] = None) -> List[Any]:
    """The RUNNING runs among ``runs`` that nobody will ever close (see the module docstring)."""
    by_id = {r.info.run_id: r for r in runs}
    dead: Set[str] = set()
    for r in runs:
        if r.info.status == "RUNNING" and owner_is_dead(r.data.tags, host, my_pid):
            dead.add(r.info.run_id)
    for r in runs:
        if r.info.status != "RUNNING" or r.info.run_id in dead or owner_is_dead(r.data.tags, host, my_pid) is not None:
            continue
        parent = by_id.get(r.data.tags.get("mlflow.parentRunId", ""))
        if parent is not None and (parent.info.run_id in dead or parent.info.status != "RUNNING"):
            dead.add(r.info.run_id)
    return [r for r in runs if r.info.run_id in dead]


def close_dead_sweep_runs(uri: str, experiment_id: str, sweep: str) -> List[str]:
    """Mark the dead RUNNING runs (parents and children) of ``sweep`` KILLED; returns their ids."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = with_retries(lambda: client.search_runs([experiment_id], filter_string=f"tags.sweep = '{sweep}'",
                                                   max_results=50000))
    out = []
    for r in dead_runs(list(runs)):
        rid = r.info.run_id
        with_retries(lambda: client.set_tag(rid, "error", DEAD_RUN_REASON))
        with_retries(lambda: client.set_terminated(rid, "KILLED"))
        out.append(rid)
    return out


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows the run: the server's page for an HTTP store, else the page ``mlflow ui`` serves
    for the store (its default address), with the command to start it."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after: mlflow ui --backend-store-uri {uri})"
