"""The load model (`simulate --load`) and the recorded-calls classifier behind its check."""

import json

from batchworker.costs.calls import api_of, component_of, count_calls
from batchworker.costs.load import BIG_BURST, BURSTY, Deployment, Workload, model, polls

AUTH = "AWS4-HMAC-SHA256 Credential=testing/20261202/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=x"


def entry(service, ua="Boto3/1.40 md/Botocore#1.40", target=None, url="http://127.0.0.1/", method="POST", body=""):
    headers = {"Authorization": AUTH.format(service=service), "User-Agent": ua}
    if target:
        headers["X-Amz-Target"] = target
    return {"headers": headers, "method": method, "url": url, "body": body, "body_encoded": False}


def test_calls_are_told_apart_by_component_and_api():
    lines = [
        entry("dynamodb", "Boto3/1.40 app/bwlocal-trigger", "DynamoDB_20120810.PutItem"),
        entry("ec2", "Boto3/1.40 app/bwlocal-worker", body="Action=DescribeInstances&Version=2016-11-15"),
        {**entry("ec2", "Boto3/1.40 app/bwlocal-stop"), "body": "QWN0aW9uPVN0b3BJbnN0YW5jZXM=", "body_encoded": True},
        entry("s3", "Boto3/1.40 app/batchworker-instance", url="http://127.0.0.1/out/jobs/j-1/manifest.json",
              method="PUT"),
        entry("ec2", body="Action=DescribeInstances"),  # an emulator's own call: no app id
    ]
    counts = count_calls(json.dumps(line) for line in lines)
    assert counts["trigger"] == {"dynamodb:PutItem": 1}
    assert counts["worker"] == {"ec2:DescribeInstances": 1}
    assert counts["stop"] == {"ec2:StopInstances": 1}  # a form body the recorder kept base64-encoded
    assert counts["instance"] == {"s3:PutObject": 1}
    assert counts["other"] == {"ec2:DescribeInstances": 1}
    assert component_of({"User-Agent": "x app/something-else"}) == "other"
    assert api_of(entry("s3", url="http://127.0.0.1/bucket?list-type=2", method="GET")) == "s3:ListObjects"


def test_polls_grow_apart():
    assert polls(0, 1, 1, 1) == 1  # a running instance: one look
    assert polls(90, 1, 1, 1) == 91  # a fixed 1 s poll through a 90 s boot
    assert polls(90, 1, 2, 5) < 25  # doubling to 5 s


def test_the_reaper_pass_no_longer_grows_with_the_pool():
    busy = Workload("busy", 3000, 60)
    for pool in (20, 200):
        today = model(busy, Deployment(version="today", pool_size=pool)).calls["reaper"]
        after = model(busy, Deployment(version="after", pool_size=pool)).calls["reaper"]
        assert today["ec2:DescribeInstances"] == (1 + pool) / 60
        assert after["ec2:DescribeInstances"] == 1 / 60


def test_a_burst_polls_ec2_less_after_and_a_small_pool_falls_behind():
    today, after = (model(BIG_BURST, Deployment(version=v)) for v in ("today", "after"))
    assert after.total("ec2:DescribeInstances") < today.total("ec2:DescribeInstances") / 3
    assert today.backlog_growth_per_second > 0 and "max_job_runtime_seconds" in today.breaks_first()
    assert "max_job_runtime_seconds" not in after.breaks_first()  # waiting is not running


def test_the_seed_workload_breaks_nothing():
    assert model(BURSTY, Deployment()).breaks_first() == "nothing"


def test_after_a_burst_costs_about_one_ec2_look_per_upload_whatever_its_size_and_holds_no_dispatcher_through_the_boot():
    for n in (1_000, 10_000):
        burst = Workload("burst", 0.0, 12.5, burst_uploads=n)
        today, after = (model(burst, Deployment(version=v)).calls["worker"]["ec2:DescribeInstances"] * 60 / n
                        for v in ("today", "after"))
        assert today > 50  # every dispatcher looks every second through the boot
        assert after < 2  # one look each; the boot is left to the instance's running event
    today, after = (model(BIG_BURST, Deployment(version=v)) for v in ("today", "after"))
    assert after.measures["lambda:concurrent executions"] < today.measures["lambda:concurrent executions"] / 10


def test_after_the_trigger_reads_no_index_and_the_index_has_no_hot_partition():
    busy = BURSTY.scaled(1000)
    today, after = (model(busy, Deployment(version=v)) for v in ("today", "after"))
    # the trigger places from the ledger items, not from the active set
    assert "dynamodb:Query" in today.calls["trigger"] and "dynamodb:Query" not in after.calls["trigger"]
    assert after.calls["trigger"]["dynamodb:BatchGetItem"] > 0
    # renewals out of the index and 2 shards a status: both measures go from over their limit to under it
    for name in ("dynamodb:status-index hot partition writes", "dynamodb:status-index reads (RCU)"):
        assert today.pressures()[name][1] >= 1.0 > after.pressures()[name][1], name


def test_the_model_shards_the_status_index_as_the_code_does():
    # The load model's "after" column counts index queries and hot-partition writes per STATUS_SHARDS: it must
    # follow the job table's own constant, not a copy that stays behind when that one changes.
    from batchworker.costs.load import STATUS_SHARDS as modelled
    from batchworker.jobs import STATUS_SHARDS

    assert modelled == STATUS_SHARDS
