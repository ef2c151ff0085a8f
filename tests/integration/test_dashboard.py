"""`batchworker dashboard` in a real browser (Debian's chromium driven by Playwright) over the local cloud."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import time
from pathlib import Path

import pytest

from batchworker.local import call_log
from batchworker.models import job_id_for
from tests.integration.conftest import CLI

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
SCREENSHOTS = REPO / "build" / "dashboard-screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
HOSTILE_KEY = "dash/<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def browser():
    # Loud, never a skip: `make test` installs chromium (Makefile target `browser`).
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install -y chromium (make browser)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dashboard_url(local_cloud):
    # Its AWS calls are recorded as the operator's (make iam-check: operator_policy_json).
    env = call_log.child_environment(
        {**os.environ, **local_cloud.env, "BATCHWORKER_LOCAL_DIR": str(local_cloud.local_dir)}, "cli:dashboard")
    process = subprocess.Popen(
        [CLI, "dashboard", "--port", "0", "--refresh-seconds", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        yield _read_url(process, timeout=60)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def _read_url(process: subprocess.Popen, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.1, deadline - time.monotonic())):
            line = process.stdout.readline()
            match = re.match(r"(http://127\.0\.0\.1:\d+/)", line or "")
            if match:
                return match.group(1)
            if not line:
                break
    process.kill()
    raise AssertionError(f"the dashboard printed no URL: {process.stderr.read()}")


def put(cloud, key: str, body: bytes) -> str:
    response = cloud.client("s3").put_object(Bucket=cloud.input_bucket, Key=key, Body=body)
    return job_id_for(cloud.input_bucket, key, response.get("VersionId") or response.get("ETag"))


def test_every_page_in_a_browser(local_cloud, browser, dashboard_url):
    # GIVEN jobs that succeeded (one under a key full of markup), one that failed and one still running
    hostile = put(local_cloud, HOSTILE_KEY, (SAMPLES / "digit-3.png").read_bytes())
    digits = put(local_cloud, "dash/digits.csv", (SAMPLES / "digits.csv").read_bytes())
    broken = put(local_cloud, "dash/broken.csv", b"1,2,3\n")
    for job_id in (hostile, digits, broken):
        local_cloud.wait_for_manifest(job_id)
    # The table follows the manifest once the stop function has read it: the page shows the table.
    local_cloud.wait_until(lambda: all((local_cloud.job(j) or {}).get("status") in ("SUCCEEDED", "FAILED")
                                       for j in (hostile, digits, broken)), 60, "the jobs' final status")
    # Last, alone: jobs of one package may take turns in its warm process, and this one must be seen running.
    running = put(local_cloud, "dash/hold.json", json.dumps({"workload": "hold", "seconds": 20}).encode())
    local_cloud.wait_until(lambda: (local_cloud.job(running) or {}).get("status") == "RUNNING", 90, "hold job running")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

    # Jobs: every job, newest first, the hostile key as text; then live: the running job ends without a reload
    page.goto(dashboard_url + "jobs")
    rows = page.locator("table.jobs tbody tr")
    for job_id in (hostile, digits, broken, running):
        assert rows.filter(has_text=job_id).count() == 1, job_id
    assert rows.filter(has_text=broken).locator(".badge").inner_text() == "FAILED"
    assert rows.filter(has_text=running).locator(".badge").inner_text() == "RUNNING"
    assert rows.filter(has_text=hostile).locator("td.key").inner_text() == HOSTILE_KEY
    assert page.locator("main img").count() == 0
    page.screenshot(path=str(SCREENSHOTS / "jobs.png"))
    page.evaluate("window.__notReloaded = true")
    badge = rows.filter(has_text=running).locator(".badge")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('table.jobs tr')].some(r => r.textContent.includes('{running}') "
        "&& r.querySelector('.badge').textContent === 'SUCCEEDED')", timeout=90_000,
    )
    assert badge.inner_text() == "SUCCEEDED" and page.evaluate("window.__notReloaded") is True
    page.goto(dashboard_url + "jobs?status=FAILED&prefix=dash/")
    assert page.locator("table.jobs tbody tr").filter(has_text=broken).count() == 1
    assert page.locator("table.jobs tbody tr").filter(has_text=digits).count() == 0

    # Job: stages, results head, label chart drawn by Chart.js, log tail, manifest
    page.goto(dashboard_url + f"jobs/{digits}")
    stages = page.locator("table.stages tbody tr")
    assert stages.count() == 6 and page.locator("table.stages tr.pending").count() == 0
    columns = page.locator("table.results thead").inner_text().split()
    assert columns[0] == "item" and {"label", "confidence"} <= set(columns)  # predictions.csv or results.csv
    assert page.evaluate("() => !!Chart.getChart(document.getElementById('label-chart'))")
    assert page.evaluate("() => Chart.getChart(document.getElementById('label-chart')).data.labels.length") >= 2
    assert page.locator("pre.manifest").inner_text().count(digits) >= 1
    assert page.locator("pre.log").inner_text().strip()
    page.screenshot(path=str(SCREENSHOTS / "job.png"), full_page=True)

    # The hostile job: its key is a heading's text, its input preview is an image served by the dashboard
    page.goto(dashboard_url + f"jobs/{hostile}")
    assert page.locator("h1 .key").inner_text() == HOSTILE_KEY
    preview = page.locator(".previews img")
    assert preview.count() == 1 and preview.get_attribute("src") == f"/jobs/{hostile}/input"
    page.wait_for_function("() => document.querySelector('.previews img').naturalWidth > 0", timeout=10_000)

    page.goto(dashboard_url + f"jobs/{broken}")
    assert "64" in page.locator(".error-box").inner_text()

    # Instances: the instance's row with running (billed) spans and busy spans inside
    page.goto(dashboard_url + "instances")
    instance_rows = page.locator("table.instances tbody tr[data-instance]")
    assert instance_rows.count() >= 1
    assert page.locator("rect.running").count() >= 1 and page.locator("rect.busy").count() >= 1
    page.screenshot(path=str(SCREENSHOTS / "instances.png"))

    # Cost: three windows and the chart
    page.goto(dashboard_url + "cost")
    assert page.locator("table.cost tbody tr").count() == 3
    assert page.evaluate("() => Chart.getChart(document.getElementById('cost-chart')).data.datasets.length") == 3
    page.screenshot(path=str(SCREENSHOTS / "cost.png"))

    # Queues: the two queues and three dead-letter queues
    page.goto(dashboard_url + "queues")
    assert page.locator("table.queues tbody tr").count() == 5
    assert "error" not in (page.locator("table.queues").get_attribute("class") or "")
    assert page.locator("table.queues td.error").count() == 0
    page.screenshot(path=str(SCREENSHOTS / "queues.png"))

    page.close()
    assert problems == []
    local_cloud.wait_until(lambda: set(local_cloud.instance_states()) == {"stopped"}, 90, "every instance stopped")
