"""Screenshots of the MLflow UI for a leverplus store: the runs table and a chart comparison of a sweep's runs.

Starts ``mlflow server`` on the given store (loopback, a free port), finds the experiment and the sweep's runs over
the REST API, and drives headless Chromium from the OS packages (``apt-get install chromium``) through Playwright
(``pip install playwright``; it uses that Chromium, nothing is downloaded)::

    python docs/screenshots.py --store sqlite:////path/to/mlflow.db [--experiment leverplus-sim] [--sweep reward_grid]
                               [--out docs/img] [--size 1600,1000] [--wait-ms 20000]

MLflow nests a sweep's job runs under their collapsed parent row; the script clicks each parent's expand button so
the job runs show. Writes ``<out>/mlflow_runs_table.png`` (the experiment's runs table with the job runs expanded:
run names, Dataset, Source, Duration), ``<out>/mlflow_runs_charts.png`` (the chart view of the same runs: one panel
per metric) and ``<out>/mlflow_compare_chart.png`` (the compare-runs page of up to 50 of the sweep's arm runs:
parameter and metric charts), palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
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


EXPAND_BUTTON = 'button:has(path[d^="M7.25 7.25V4.5"])'  # the "+" square beside a parent run's name
CLOSE_ASSISTANT = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
CHART_VIEW = 'input[name="runs-view-mode"][value="CHART"]'  # the runs page's table / chart / artifact switch


def _quantise(out: Path) -> None:
    img = Image.open(out).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def shoot_all(chromium: str, pages: List[tuple], size: str, wait_ms: int) -> None:
    """Each (url, out, expand, chart) page: let the UI's JavaScript settle for ``wait_ms``, close the assistant panel,
    switch to the chart view when ``chart``, click every parent row's expand button when ``expand``, then capture."""
    from playwright.sync_api import sync_playwright

    w, h = (int(x) for x in size.split(","))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": w, "height": h})
            for url, out, expand, chart in pages:
                page.goto(url)
                page.wait_for_timeout(wait_ms)
                if page.locator(CLOSE_ASSISTANT).count():  # MLflow's chat side panel: the runs get its width
                    page.locator(CLOSE_ASSISTANT).first.click()
                if chart and page.locator(CHART_VIEW).count():  # first: switching views collapses the rows again
                    page.locator(CHART_VIEW).first.locator("xpath=..").click(force=True)  # its icon covers it
                    page.wait_for_timeout(min(wait_ms, 8000))
                if expand:
                    for button in page.locator(EXPAND_BUTTON).all():
                        button.click()
                    page.wait_for_timeout(min(wait_ms, 8000))
                page.screenshot(path=str(out))
                _quantise(out)
        finally:
            browser.close()


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
        runs_page = f"{url}/#/experiments/{eid}/runs"
        compare = (f"{url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                   f"&experiments={urllib.parse.quote(json.dumps([eid]))}")
        shoot_all(chromium, [(runs_page, out / "mlflow_runs_table.png", True, False),
                             (runs_page, out / "mlflow_runs_charts.png", True, True),
                             (compare, out / "mlflow_compare_chart.png", False, False)], args.size, args.wait_ms)
        for name in ("mlflow_runs_table.png", "mlflow_runs_charts.png", "mlflow_compare_chart.png"):
            print(f"{out / name}: {(out / name).stat().st_size // 1024} KB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
