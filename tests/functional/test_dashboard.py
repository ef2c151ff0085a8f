"""The dashboard's pages over the in-process moto stack: paging from the status index, escaping, images, queues."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from PIL import Image

from batchworker.cli.client import Deployment
from batchworker.dashboard.app import create_app
from batchworker.dashboard.job_index import JobIndex, decode_cursor
from batchworker.instances import InstanceHistory
from batchworker.jobs import JobStore
from batchworker.models import Job, JobStatus, job_id_for, utc_now
from tests.functional.conftest import PREFIX

HOSTILE_KEY = "<img src=x onerror=alert(1)>.png"


@pytest.fixture
def deployment(stack) -> Deployment:
    return Deployment(stack.input_bucket, stack.output_bucket, stack.jobs_table, stack.events_table, PREFIX,
                      region="us-east-1")


@pytest.fixture
def client(deployment):
    app = create_app(deployment, refresh_seconds=0)
    return app.test_client()


def make_job(stack, key: str, status: JobStatus, minutes_ago: float, error: str | None = None) -> str:
    job_id = job_id_for(stack.input_bucket, key, "v1")
    store = JobStore(stack.jobs_table, client=stack.client("dynamodb"))
    created = utc_now() - timedelta(minutes=minutes_ago)
    store.create_queued(Job(job_id, JobStatus.QUEUED, stack.input_bucket, key), now=created)
    if status is not JobStatus.QUEUED:
        store.transition(job_id, status, allowed_from=[JobStatus.QUEUED], instance_id=stack.instance_id, error=error,
                         now=created + timedelta(seconds=30))
    return job_id


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jobs_pages_newest_first_across_statuses_without_repeats(stack):
    # GIVEN 23 jobs spread over every status, one minute apart
    statuses = list(JobStatus)
    made = [make_job(stack, f"k/{n:02d}.csv", statuses[n % len(statuses)], minutes_ago=100 - n) for n in range(23)]
    index = JobIndex(stack.jobs_table, stack.client("dynamodb"))
    # WHEN read in pages of 5
    seen, cursor = [], None
    for _ in range(10):
        page = index.page(5, cursor=cursor)
        seen.extend(row.job_id for row in page.rows)
        cursor = page.next_cursor
        if not cursor:
            break
    # THEN every job comes once, newest first
    assert seen == list(reversed(made))


def test_status_filter_and_key_prefix_search(stack):
    make_job(stack, "scans/a.csv", JobStatus.SUCCEEDED, 5)
    failed = make_job(stack, "scans/b.csv", JobStatus.FAILED, 4, error="bad rows")
    make_job(stack, "other/c.csv", JobStatus.FAILED, 3)
    index = JobIndex(stack.jobs_table, stack.client("dynamodb"))
    assert [r.job_id for r in index.page(10, statuses=("FAILED",), key_prefix="scans/").rows] == [failed]
    assert len(index.page(10, key_prefix="scans/").rows) == 2
    # A search that runs out of read budget returns what it has and a cursor that goes on from there.
    first = index.page(10, key_prefix="scans/", read_budget=1)
    rest = index.page(10, key_prefix="scans/", cursor=first.next_cursor) if first.next_cursor else None
    found = [r.input_key for r in first.rows] + ([r.input_key for r in rest.rows] if rest else [])
    assert sorted(found) == ["scans/a.csv", "scans/b.csv"]


def test_a_forged_cursor_is_a_bad_request(client):
    assert client.get("/jobs?cursor=not-a-cursor").status_code == 400
    assert client.get("/jobs?status=NOPE").status_code == 400
    with pytest.raises(ValueError):
        decode_cursor("eyJGT08iOm51bGx9")  # {"FOO":null}


def test_hostile_key_error_and_manifest_render_as_text(stack, client):
    # GIVEN a failed job whose key, error and manifest carry markup
    job_id = make_job(stack, HOSTILE_KEY, JobStatus.FAILED, 1, error="<script>alert(2)</script> bad")
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.input_bucket, Key=HOSTILE_KEY, Body=png_bytes())
    prefix = f"jobs/{job_id}/"
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "job.log", Body=b"line one\n<b>bold?</b>\n")
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "predictions.csv",
                  Body=b"item,label,confidence\n<i>0</i>,3,0.97\n1,3,0.55\n2,7,0.91\n")
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "errors.jsonl", Body=json.dumps(
        {"item": "<svg onload=alert(4)>", "type": "InputError", "message": "<u>bad</u>", "traceback": ""}).encode())
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "manifest.json", Body=json.dumps(
        {"job_id": job_id, "status": "failed", "error": "</pre><script>alert(3)</script>",
         "input": {"bucket": stack.input_bucket, "key": HOSTILE_KEY}, "timings": {}}).encode())
    # WHEN the jobs and job pages render
    listing = client.get("/jobs").get_data(as_text=True)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    # THEN no markup from the data survives, it shows as text
    for html in (listing, page):
        assert "<img src=x" not in html and "<script>alert" not in html
        assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "&lt;i&gt;0&lt;/i&gt;" in page
    assert "&lt;svg onload=alert(4)&gt;" in page and "&lt;u&gt;bad&lt;/u&gt;" in page and "<svg onload" not in page
    chart = json.loads(page.split('id="results-chart-data">')[1].split("</script>")[0])
    assert chart["labels"] == ["3", "7"] and chart["counts"] == [2, 1]
    # AND the input preview is served by the dashboard as an image, with no bucket URL in the page
    assert "X-Amz-Signature" not in page and stack.input_bucket + ".s3" not in page
    image = client.get(f"/jobs/{job_id}/input")
    assert image.status_code == 200 and image.mimetype == "image/png" and image.data == png_bytes()


def test_a_package_job_with_no_failed_item_renders(stack, client):
    # GIVEN a succeeded package job: results.csv, and the EMPTY errors.jsonl every package job uploads
    job_id = make_job(stack, "digits/a.png", JobStatus.SUCCEEDED, 1)
    prefix = f"jobs/{job_id}/"
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "results.csv", Body=b"item,label,confidence\na.png,3,0.9\n")
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "errors.jsonl", Body=b"")
    s3.put_object(Bucket=stack.output_bucket, Key=prefix + "manifest.json", Body=json.dumps(
        {"job_id": job_id, "status": "succeeded", "error": None, "timings": {},
         "input": {"bucket": stack.input_bucket, "key": "digits/a.png"}}).encode())
    # WHEN its page renders THEN it shows the results (an empty object answers a ranged GET with InvalidRange)
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert "a.png" in response.get_data(as_text=True)


def test_every_response_carries_a_strict_content_security_policy(client):
    response = client.get("/jobs")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_only_loopback_host_headers_are_served(client):
    assert client.get("/jobs", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/jobs", headers={"Host": "127.0.0.1:8471"}).status_code == 200


def test_output_previews_are_images_only(stack, client):
    job_id = make_job(stack, "x.png", JobStatus.SUCCEEDED, 1)
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.output_bucket, Key=f"jobs/{job_id}/outputs/a b.png", Body=png_bytes())
    s3.put_object(Bucket=stack.output_bucket, Key=f"jobs/{job_id}/outputs/x.svg", Body=b"<svg onload=alert(1)>")
    assert client.get(f"/jobs/{job_id}/outputs/outputs/a%20b.png").data == png_bytes()
    assert client.get(f"/jobs/{job_id}/outputs/outputs/x.svg").status_code == 404
    assert client.get("/jobs/j-nothex/outputs/outputs/a.png").status_code == 404


def test_instances_and_cost_pages_show_billed_and_busy_time(stack, client):
    history = InstanceHistory(stack.events_table, client=stack.client("dynamodb"))
    now = utc_now()
    history.record(stack.instance_id, "start", "job queued", now=now - timedelta(minutes=10))
    history.record(stack.instance_id, "stop", "idle for 60 s", now=now - timedelta(minutes=2))
    make_job(stack, "done.csv", JobStatus.SUCCEEDED, 9)
    html = client.get("/instances").get_data(as_text=True)
    assert stack.instance_id in html and "idle for 60 s" in html
    assert 'class="running"' in html and 'class="busy"' in html
    cost = client.get("/cost").get_data(as_text=True)
    assert "today" in cost and "30 days" in cost and "start-per-upload" in cost
    data = json.loads(cost.split('id="cost-chart-data">')[1].split("</script>")[0])
    assert data["this_system"][0] > 0  # 8 minutes of g4dn.xlarge


def test_queues_page_peeks_dead_letters_without_consuming_them(stack, client):
    sqs = stack.client("sqs")
    urls = {suffix: sqs.create_queue(QueueName=f"{PREFIX}-{suffix}")["QueueUrl"]
            for suffix in ("jobs", "jobs-dlq", "done", "done-dlq", "worker-dlq")}
    sqs.send_message(QueueUrl=urls["jobs-dlq"], MessageBody='{"key": "<b>x</b>"}')
    html = client.get("/queues").get_data(as_text=True)
    assert "&lt;b&gt;x&lt;/b&gt;" in html and f"{PREFIX}-jobs-dlq" in html
    # The message is still there for anyone else.
    left = sqs.get_queue_attributes(QueueUrl=urls["jobs-dlq"], AttributeNames=["ApproximateNumberOfMessages"])
    assert left["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_the_server_binds_loopback_unless_told_otherwise(deployment):
    from batchworker.cli.dashboard_cmd import make_server, trusted_hosts
    from batchworker.cli.main import build_parser

    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"
    server = make_server(deployment, args.host, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    assert trusted_hosts("127.0.0.1") is None and trusted_hosts("0.0.0.0") == []
    assert "10.1.2.3" in trusted_hosts("10.1.2.3")
