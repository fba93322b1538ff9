"""Screenshots of the MLflow UI for a leverplus store: the runs table and a chart comparison of a sweep's runs.

Starts ``mlflow server`` on the given store (loopback, a free port), finds the experiment and the sweep's runs over
the REST API, and takes each page with headless Chromium from the OS packages (``apt-get install chromium``)::

    python docs/screenshots.py --store sqlite:////path/to/mlflow.db [--experiment leverplus-sim] [--sweep reward_grid]
                               [--out docs/img] [--size 1600,1000] [--wait-ms 20000]

Writes ``<out>/mlflow_runs_table.png`` (the experiment's runs table: run names, Dataset, Source, User, Version and
metric columns), ``<out>/mlflow_runs_charts.png`` (the experiment's chart view: one panel per metric, a bar or line
per run) and ``<out>/mlflow_compare_chart.png`` (the compare-runs page of the sweep's arm runs: parameter and metric
charts), palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List

from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("mlflow server exited")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("mlflow server did not answer /health")


def shoot(chromium: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    """One page: headless Chromium lets the UI's JavaScript run for ``wait_ms`` of virtual time, then captures."""
    with tempfile.TemporaryDirectory(prefix="lp-chromium-") as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=300)
    img = Image.open(out).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:////abs/path/mlflow.db")
    ap.add_argument("--artifacts", default=None, help="artifact root the store's experiments use (default: beside it)")
    ap.add_argument("--experiment", default="leverplus-sim")
    ap.add_argument("--sweep", default="reward_grid")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "img"))
    ap.add_argument("--size", default="1600,1000")
    ap.add_argument("--wait-ms", type=int, default=20000)
    args = ap.parse_args(argv)
    chromium = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if chromium is None:
        raise SystemExit("no chromium found: apt-get update && apt-get install -y chromium")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if args.artifacts:
        cmd += ["--artifacts-destination", args.artifacts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # the UI only; no GenAI job runner
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_healthy(url, proc)
        exp = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?"
                   + urllib.parse.urlencode({"experiment_name": args.experiment}))["experiment"]
        eid = exp["experiment_id"]
        runs = _get(f"{url}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [eid], "max_results": 50,
                     "filter": f"tags.sweep = '{args.sweep}' and tags.role != 'parent'"}).get("runs", [])
        ids = [r["info"]["run_id"] for r in runs]
        # the sweep's job runs at top level (unfiltered, MLflow nests them under the collapsed parent run)
        facets = urllib.parse.urlencode({"searchFilter": f"tags.sweep = '{args.sweep}' and tags.role != 'parent'"},
                                        quote_via=urllib.parse.quote)
        shoot(chromium, f"{url}/#/experiments/{eid}/runs?{facets}", out / "mlflow_runs_table.png", args.size,
              args.wait_ms)
        shoot(chromium, f"{url}/#/experiments/{eid}/runs?{facets}&compareRunsMode=CHART",
              out / "mlflow_runs_charts.png", args.size, args.wait_ms)
        compare = (f"{url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                   f"&experiments={urllib.parse.quote(json.dumps([eid]))}")
        shoot(chromium, compare, out / "mlflow_compare_chart.png", args.size, args.wait_ms)
        for name in ("mlflow_runs_table.png", "mlflow_runs_charts.png", "mlflow_compare_chart.png"):
            print(f"{out / name}: {(out / name).stat().st_size // 1024} KB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
