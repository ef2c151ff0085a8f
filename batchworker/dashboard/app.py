"""The dashboard's web app (Flask): read-only pages over one deployment, with the caller's AWS credentials.

Every page renders on the server through autoescaping templates; `?partial=1` renders only its live part,
which the page's script fetches again every few seconds. Images are proxied, never linked to a bucket.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from flask import Flask, Response, abort, redirect, render_template, request, url_for

from batchworker.cli.client import Deployment
from batchworker.costs.billing import PRICES
from batchworker.dashboard.artifacts import PREVIEW_MAX_COUNT, JobArtifacts, image_type
from batchworker.dashboard.cost_view import cost_windows
from batchworker.dashboard.job_index import ALL_STATUSES, JobIndex
from batchworker.dashboard.queues import Queues
from batchworker.dashboard.stages import job_stages, stage_segments
from batchworker.dashboard.usage import TIMELINE_WIDTH, build_timeline, fit_window_start
from batchworker.instances import InstanceHistory, InstancePool
from batchworker.models import output_prefix, parse_time, utc_now

JOB_ID = re.compile(r"^j-[0-9a-f]{16}$")
PAGE_SIZE = 50
DEFAULT_INSTANCE_TYPE = "g4dn.xlarge"
COST_CACHE_SECONDS = 30.0
WINDOW_HOURS = {"1h": 1, "6h": 6, "24h": 24, "7d": 168}
# Scripts, styles and images from the dashboard itself only; no inline script or style, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]
PACKAGE_DIR = Path(__file__).resolve().parent


class Dashboard:
    """The deployment's readers, built once and shared by every request (boto3 clients are thread-safe)."""

    def __init__(self, deployment: Deployment, instance_type: str | None, hourly_price_dollars: float | None):
        dynamodb = deployment.client("dynamodb")
        self.deployment = deployment
        self.jobs = JobIndex(deployment.jobs_table, dynamodb)
        self.history = InstanceHistory(deployment.instance_events_table, client=dynamodb)
        self.pool = InstancePool(deployment.pool_tag, self.history, client=deployment.client("ec2"))
        self.artifacts = JobArtifacts(deployment.output_bucket, deployment.client("s3"))
        self.queues = Queues(deployment.pool_tag, deployment.client("sqs"))
        self.instance_type = instance_type
        self.hourly_price_dollars = hourly_price_dollars
        self._cost_cache: tuple[float, dict] | None = None
        self._cost_lock = threading.Lock()

    def pricing(self, instances) -> tuple[str, float]:
        """The instance type to price as (the pool's own when it has a known price) and its hourly price."""
        pool_type = next((i.instance_type for i in instances if i.instance_type in PRICES), None)
        instance_type = self.instance_type or pool_type or DEFAULT_INSTANCE_TYPE
        if self.hourly_price_dollars is not None:
            return instance_type, self.hourly_price_dollars
        return instance_type, PRICES.get(instance_type, PRICES[DEFAULT_INSTANCE_TYPE])

    def events(self, instances) -> list[dict]:
        return [event for instance in instances for event in self.history.events(instance.instance_id)]

    def cost_context(self) -> dict:
        """Cost windows, recomputed at most every COST_CACHE_SECONDS (30 days of jobs and a simulation)."""
        with self._cost_lock:
            if self._cost_cache and time.monotonic() - self._cost_cache[0] < COST_CACHE_SECONDS:
                return self._cost_cache[1]
            now = utc_now()
            found = self.pool.list()
            instance_type, price = self.pricing(found)
            rows = self.jobs.since(now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=30))
            windows = cost_windows(self.events(found), rows, now, instance_type, price)
            chart = {
                "windows": [w.name for w in windows],
                "this_system": [round(w.cost_dollars, 4) for w in windows],
                "always_on": [round(w.always_on_dollars, 4) for w in windows],
                "per_upload": [round(w.per_upload_dollars, 4) for w in windows],
            }
            context = {"windows": windows, "instance_type": instance_type, "price": price, "chart": chart,
                       "computed_at": now}
            self._cost_cache = (time.monotonic(), context)
            return context


def create_app(
    deployment: Deployment,
    refresh_seconds: float = 5.0,
    instance_type: str | None = None,
    hourly_price_dollars: float | None = None,
    trusted_hosts: list[str] | None = None,
) -> Flask:
    app = Flask(
        __name__, template_folder=str(PACKAGE_DIR / "templates"), static_folder=str(PACKAGE_DIR / "static"),
    )
    # Only these Host headers are served: a page elsewhere cannot reach this one by DNS rebinding.
    # None: loopback names; an empty list: any host (the operator bound every interface on purpose).
    app.config["TRUSTED_HOSTS"] = LOOPBACK_HOSTS if trusted_hosts is None else (trusted_hosts or None)
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 300
    board = Dashboard(deployment, instance_type, hourly_price_dollars)
    refresh_ms = int(refresh_seconds * 1000)
    _add_filters(app)

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if response.mimetype == "text/html":
            response.headers["Cache-Control"] = "no-store"
        return response

    def page(template: str, live_template: str, **context):
        context.update(refresh_ms=refresh_ms, now=utc_now(), deployment=deployment)
        if request.args.get("partial") == "1":
            return render_template(live_template, **context)
        return render_template(template, live_template=live_template, **context)

    @app.get("/")
    def index():
        return redirect(url_for("jobs"))

    @app.get("/jobs")
    def jobs():
        status = request.args.get("status", "")
        prefix = request.args.get("prefix", "")[:1024]
        cursor = request.args.get("cursor") or None
        known = [s.value for s in ALL_STATUSES]
        if status and status not in known:
            abort(400, f"unknown status {status!r}")
        try:
            found = board.jobs.page(PAGE_SIZE, (status,) if status else tuple(known), cursor, prefix)
        except ValueError:
            abort(400, "bad page cursor")
        show_package = any(row.package for row in found.rows)
        return page("jobs.html", "jobs_live.html", page=found, status=status, prefix=prefix, cursor=cursor,
                    statuses=known, show_package=show_package, section="jobs")

    @app.get("/jobs/<job_id>")
    def job(job_id: str):
        row = _job_or_404(board, job_id)
        manifest = board.artifacts.manifest(job_id)
        keys = board.artifacts.output_keys(job_id) if manifest or row.is_terminal else []
        events = board.history.events(row.instance_id) if row.instance_id else []
        uploaded = board.artifacts.uploaded_at(row.input_bucket, row.input_key) if row.input_key else None
        results = board.artifacts.results(job_id, keys) if keys else None
        stages = job_stages(row, manifest, uploaded, events)
        prefix = output_prefix(job_id)
        images = [key[len(prefix):] for key in keys if image_type(key)][:PREVIEW_MAX_COUNT]
        return page(
            "job.html", "job_live.html", job=row, manifest=manifest,
            manifest_text=json.dumps(manifest, indent=2, sort_keys=True) if manifest else None,
            stages=stages, segments=stage_segments(stages, TIMELINE_WIDTH), width=TIMELINE_WIDTH,
            log=board.artifacts.log_tail(job_id) if keys else None, results=results,
            chart=results.chart if results else None, images=images,
            item_errors=board.artifacts.item_errors(job_id, keys) if keys else None,
            input_is_image=bool(image_type(row.input_key)), section="jobs",
        )

    @app.get("/jobs/<job_id>/input")
    def job_input(job_id: str):
        row = _job_or_404(board, job_id)
        kind = image_type(row.input_key)
        if not kind or row.input_bucket != deployment.input_bucket:
            abort(404)
        return _image(board.artifacts.object_bytes(row.input_bucket, row.input_key), kind)

    @app.get("/jobs/<job_id>/outputs/<path:name>")
    def job_output(job_id: str, name: str):
        if not JOB_ID.match(job_id):
            abort(404)
        kind = image_type(name)
        if not kind:
            abort(404)
        return _image(board.artifacts.object_bytes(deployment.output_bucket, output_prefix(job_id) + name), kind)

    @app.get("/instances")
    def instances():
        window = request.args.get("window", "fit")
        if window != "fit" and window not in WINDOW_HOURS:
            abort(400, "unknown window")
        now = utc_now()
        found = board.pool.list()
        events = board.events(found)
        start = fit_window_start(events, now, WINDOW_HOURS.get(window))
        rows = board.jobs.since(start - timedelta(days=1))  # a job queued before the window may run inside it
        instance_type, price = board.pricing(found)
        timeline = build_timeline(found, events, rows, now, start, instance_type, price)
        return page("instances.html", "instances_live.html", timeline=timeline, window=window,
                    windows=["fit", *WINDOW_HOURS], width=TIMELINE_WIDTH, price=price, instance_type=instance_type,
                    section="instances")

    @app.get("/cost")
    def cost():
        return page("cost.html", "cost_live.html", section="cost", **board.cost_context())

    @app.get("/queues")
    def queues():
        return page("queues.html", "queues_live.html", queues=board.queues.views(), section="queues")

    return app


def _job_or_404(board: Dashboard, job_id: str):
    if not JOB_ID.match(job_id):
        abort(404)
    row = board.jobs.get(job_id)
    if row is None:
        abort(404)
    return row


def _image(body: bytes | None, kind: str) -> Response:
    if body is None:
        abort(404)
    response = Response(body, mimetype=kind)
    # Served as an image and nothing else, even if its bytes say otherwise.
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response.headers["Content-Disposition"] = "inline"
    response.headers["Cache-Control"] = "private, max-age=60"
    return response


def _add_filters(app: Flask) -> None:
    @app.template_filter("seconds")
    def seconds_text(value: float | None) -> str:
        if value is None:
            return "-"
        if value < 120:
            return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
        if value < 7200:
            return f"{value / 60:.1f} min"
        if value < 172800:
            return f"{value / 3600:.1f} h"
        return f"{value / 86400:.1f} d"

    @app.template_filter("clock")
    def clock(value: str | datetime | None) -> str:
        """HH:MM:SS UTC, with the date when it is not today."""
        if not value:
            return "-"
        moment = value if isinstance(value, datetime) else parse_time(str(value).split("#")[0])
        if moment.date() == utc_now().date():
            return moment.strftime("%H:%M:%S")
        return moment.strftime("%Y-%m-%d %H:%M")
