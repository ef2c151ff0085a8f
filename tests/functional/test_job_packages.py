"""Job packages through the instance's runner (`batchworker job run`'s run_local: real handler processes,
real environments built with pip, offline), and the handler contract in a plain Python shell."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from worker.errors import InputError
from worker.handler_context import JobContext, OutputRefused
from worker.items import expand_items
from worker.local_run import run_local

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "jobs"
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def job_root(tmp_path_factory) -> Path:
    """One job root for the module: package environments are built once and reused, as on an instance."""
    return tmp_path_factory.mktemp("job-root")


@pytest.fixture(autouse=True)
def offline_installer(monkeypatch):
    monkeypatch.setenv("BATCHWORKER_PIP_ARGS", "--no-index")  # tests never reach a package index


def make_package(root: Path, handler: str, *, requirements: str | None = None, extra_toml: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    toml = f'name = "testjob"\nentrypoint = "handler:Job"\naccept = [".txt", ".zip"]\n{extra_toml}'
    if requirements is not None:
        toml += '\nrequirements = "requirements.txt"\n'
        (root / "requirements.txt").write_text(requirements)
    (root / "job.toml").write_text(toml)
    (root / "handler.py").write_text(textwrap.dedent(handler))
    return root


def text_inputs(tmp_path: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")
        paths.append(path)
    return paths


def job_files(out: Path, manifest: dict) -> Path:
    return out / "jobs" / manifest["job_id"]


COUNTING_HANDLER = """
    import os
    from pathlib import Path

    class Job:
        def setup(self, ctx):
            with open(os.environ["SETUP_LOG"], "a") as fh:
                fh.write(f"{os.getpid()}\\n")

        def process(self, items, ctx):
            for item in items:
                with ctx.item(item):
                    text = Path(item.path).read_text()
                    if "bad" in item.name:
                        raise ValueError(f"cannot score {item.name}")
                    ctx.write_output(f"{Path(item.name).stem}.upper.txt", text.upper().encode())
                    yield item, {"chars": len(text), "pid": os.getpid(), "scale": ctx.params["scale"]}
"""
SCALE_PARAM = '\n[params.scale]\ntype = "int"\ndefault = 2\nmin = 1\nmax = 10\n'


def test_rows_outputs_and_one_setup_for_many_jobs(tmp_path, job_root, monkeypatch):
    # GIVEN a package whose setup() logs every call, and three inputs (three jobs)
    setup_log = tmp_path / "setup.log"
    monkeypatch.setenv("SETUP_LOG", str(setup_log))
    package = make_package(tmp_path / "pkg", COUNTING_HANDLER, extra_toml=SCALE_PARAM)
    inputs = text_inputs(tmp_path, "a.txt", "b.txt", "c.txt")
    # WHEN they run through the instance's runner, with a parameter given as text
    manifests = run_local(package, inputs, tmp_path / "out", {"scale": "5"}, job_root=job_root)
    # THEN every job succeeded with its rows and outputs, and setup() ran once, in one process
    assert [m["status"] for m in manifests] == ["succeeded"] * 3
    assert setup_log.read_text().count("\n") == 1
    pids = set()
    for manifest, name in zip(manifests, ("a", "b", "c"), strict=True):
        files = job_files(tmp_path / "out", manifest)
        rows = list(csv.DictReader((files / "results.csv").open()))
        assert rows == [{"item": f"{name}.txt", "chars": str(len(f"content of {name}.txt\n")),
                         "pid": rows[0]["pid"], "scale": "5"}]
        pids.add(rows[0]["pid"])
        assert (files / "outputs" / f"{name}.upper.txt").read_text() == f"CONTENT OF {name.upper()}.TXT\n"
        prefix = f"jobs/{manifest['job_id']}/"
        assert manifest["outputs"] == [prefix + "results.csv", prefix + "errors.jsonl",
                                       prefix + f"outputs/{name}.upper.txt", prefix + "job.log"]
        assert (manifest["items"], manifest["items_succeeded"], manifest["items_failed"]) == (1, 1, 0)
        assert manifest["package"]["name"] == "testjob" and len(manifest["package"]["version"]) == 64
        assert manifest["environment"] == {"key": "base", "cache_hit": True, "build_s": 0.0}
        assert (files / "errors.jsonl").read_text() == ""
    assert len(pids) == 1


def test_one_item_raising_fails_only_that_item(tmp_path, job_root, monkeypatch):
    monkeypatch.setenv("SETUP_LOG", str(tmp_path / "setup.log"))
    archive = tmp_path / "in" / "batch.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("one.txt", "bad-two.txt", "three.txt", "four.txt"):
            zf.writestr(f"docs/{name}", f"text {name}")
    strict = make_package(tmp_path / "strict", COUNTING_HANDLER, extra_toml=SCALE_PARAM)
    tolerant = make_package(tmp_path / "tolerant", COUNTING_HANDLER,
                            extra_toml="max_failed_ratio = 0.25\n" + SCALE_PARAM)
    # WHEN one item of four raises
    (failed,) = run_local(strict, [archive], tmp_path / "out", job_root=job_root)
    (passed,) = run_local(tolerant, [archive], tmp_path / "out", job_root=job_root)
    # THEN the other three have their rows and outputs; the item's error is in errors.jsonl
    for manifest in (failed, passed):
        files = job_files(tmp_path / "out", manifest)
        assert (manifest["items"], manifest["items_succeeded"], manifest["items_failed"]) == (4, 3, 1)
        rows = list(csv.DictReader((files / "results.csv").open()))
        assert [row["item"] for row in rows] == ["docs/one.txt", "docs/three.txt", "docs/four.txt"]
        (error,) = [json.loads(line) for line in (files / "errors.jsonl").read_text().splitlines()]
        assert (error["item"], error["type"], error["message"]) == (
            "docs/bad-two.txt", "ValueError", "cannot score docs/bad-two.txt")
        assert "raise ValueError" in error["traceback"]
        assert sorted(p.name for p in (files / "outputs").iterdir()) == [
            "four.upper.txt", "one.upper.txt", "three.upper.txt"]
    # AND the status follows max_failed_ratio: 1/4 fails a package allowing 0, passes one allowing 0.25
    assert failed["status"] == "failed" and passed["status"] == "succeeded" and passed["error"] is None
    assert "1 of 4 items failed" in failed["error"] and "errors.jsonl" in failed["error"]
    assert "docs/bad-two.txt: ValueError: cannot score" in failed["error"]


def test_setup_raising_fails_the_job_with_the_reason(tmp_path, job_root):
    package = make_package(tmp_path / "pkg", """
        class Job:
            def setup(self, ctx):
                raise RuntimeError("weights/model.pt is missing")

            def process(self, items, ctx):
                yield from ()
    """)
    (manifest,) = run_local(package, text_inputs(tmp_path, "a.txt"), tmp_path / "out", job_root=job_root)
    assert manifest["status"] == "failed"
    assert manifest["error"].startswith("setup failed: RuntimeError: weights/model.pt is missing")
    assert "fix the handler's setup()" in manifest["error"]


def test_writing_outside_the_output_folder_is_refused(tmp_path, job_root):
    package = make_package(tmp_path / "pkg", """
        class Job:
            def process(self, items, ctx):
                for item in items:
                    with ctx.item(item):
                        ctx.write_output("../../escaped.txt", b"out of bounds")
                        yield item, {"ok": True}
    """)
    (manifest,) = run_local(package, text_inputs(tmp_path, "a.txt"), tmp_path / "out", job_root=job_root)
    files = job_files(tmp_path / "out", manifest)
    assert manifest["status"] == "failed" and manifest["items_failed"] == 1
    (error,) = [json.loads(line) for line in (files / "errors.jsonl").read_text().splitlines()]
    assert error["type"] == "OutputRefused" and "outside the job's output folder" in error["message"]
    assert not list(tmp_path.rglob("escaped.txt")) and not list(job_root.rglob("escaped.txt"))


def test_requirement_that_does_not_exist_fails_fast_with_the_installer_output(tmp_path, job_root):
    package = make_package(tmp_path / "pkg", "class Job:\n    def process(self, items, ctx):\n        yield from ()\n",
                           requirements="batchworker-no-such-requirement==9.9.9\n")
    inputs = text_inputs(tmp_path, "a.txt", "b.txt")
    first, second = run_local(package, inputs, tmp_path / "out", job_root=job_root)
    for manifest in (first, second):
        assert manifest["status"] == "failed"
        assert "installing the package's requirements failed" in manifest["error"]
        assert "batchworker-no-such-requirement" in manifest["error"]  # pip's own words, tail
    # the second job of the package does not build again: it fails at once on the recorded failure
    assert second["timings"]["environment_s"] < 0.5
    assert not [p for p in (job_root / ".envs").iterdir() if p.is_dir()]  # nothing half-built left


def test_tabular_example_builds_its_environment_once(tmp_path, job_root):
    package = EXAMPLES / "tabular"
    if not (package / "model" / "iris.json").exists():
        pytest.skip("make build trains the tabular example")
    sample = package / "sample" / "flowers.csv"
    first, second = run_local(package, [sample, sample], tmp_path / "out", {"min_confidence": "0.5"},
                              job_root=job_root)
    assert first["status"] == second["status"] == "succeeded", first["error"]
    assert first["environment"]["key"] == second["environment"]["key"] != "base"
    assert (first["environment"]["cache_hit"], second["environment"]["cache_hit"]) == (False, True)
    assert first["environment"]["build_s"] > 0
    scored = list(csv.DictReader((job_files(tmp_path / "out", first) / "outputs" / "flowers.scored.csv").open()))
    assert [row["flower_id"] for row in scored][:3] == ["f0", "f1", "f2"]
    assert {row["species"] for row in scored} == {"setosa", "versicolor", "virginica"}
    assert "prob_setosa" in scored[0]


def test_edges_example_runs_in_a_plain_shell_with_a_fake_context(tmp_path):
    # GIVEN the handler imported like any module, and a context made of plain objects (no batchworker)
    spec = importlib.util.spec_from_file_location("edges_handler", EXAMPLES / "edges" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = {}
    ctx = SimpleNamespace(package_dir=EXAMPLES / "edges", device="cpu", log=logging.getLogger("t"),
                          params={"format": "png", "threshold": 0.1},
                          write_output=lambda name, data: written.setdefault(name, data))
    ctx.item = lambda item: __import__("contextlib").nullcontext()
    handler = module.EdgeMaps()
    handler.setup(ctx)
    item = SimpleNamespace(name="digit-0.png", path=SAMPLES / "digit-0.png")
    ((got, row),) = list(handler.process([item], ctx))
    assert got is item and row["width"] == 128 and row["output"] == "outputs/digit-0.edges.png"
    assert written["digit-0.edges.png"].startswith(b"\x89PNG")


def test_write_output_refuses_names_that_leave_the_folder(tmp_path):
    ctx = JobContext(tmp_path, logging.getLogger("t"), job_id="j-0", params={}, output_dir=tmp_path / "out")
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    for name in ("../x", "/etc/passwd", "a/../../x", "", "link/x", "C:\\x", ".", "a\0b"):
        with pytest.raises(OutputRefused):
            ctx.write_output(name, b"x")
    assert ctx.write_output("masks/a.png", b"ok").read_bytes() == b"ok"
    source = tmp_path / "src.bin"
    source.write_bytes(b"copied")
    assert ctx.write_output("b.bin", source).read_bytes() == b"copied"
    assert ctx.write_output("c.txt", "text ü").read_text(encoding="utf-8") == "text ü"


def test_zip_items_reject_traversal_and_bombs(tmp_path, monkeypatch):
    def zip_of(entries: dict[str, bytes]) -> Path:
        path = tmp_path / f"z{len(list(tmp_path.iterdir()))}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries.items():
                zf.writestr(name, data)
        return path

    items = expand_items(zip_of({"a/b.txt": b"1", "__MACOSX/._b.txt": b"x", "c.PNG": b"2"}), "in.zip",
                         tmp_path / "items")
    assert [(i.name, i.path.name, i.path.read_bytes()) for i in items] == [
        ("a/b.txt", "00001.txt", b"1"), ("c.PNG", "00002.png", b"2")]
    with pytest.raises(InputError, match="absolute or '..' path"):
        expand_items(zip_of({"../evil.txt": b"x"}), "in.zip", tmp_path / "i2")
    monkeypatch.setattr("worker.items.MAX_ZIP_UNCOMPRESSED_BYTES", 1000)
    with pytest.raises(InputError, match="exceed"):
        expand_items(zip_of({"big.txt": b"0" * 5000}), "in.zip", tmp_path / "i3")
    monkeypatch.setattr("worker.items.MAX_ZIP_ENTRIES", 2)
    with pytest.raises(InputError, match="entries"):
        expand_items(zip_of({"1": b"", "2": b"", "3": b""}), "in.zip", tmp_path / "i4")


def test_tables_through_the_runner_count_rows_and_fail_their_own_item(tmp_path, job_root):
    # GIVEN a package yielding one table per item (one row per word), and a mismatched table for "bad"
    package = make_package(tmp_path / "pkg", """
        from pathlib import Path

        class Job:
            def process(self, items, ctx):
                for item in items:
                    with ctx.item(item):
                        words = Path(item.path).read_text().split()
                        lengths = [len(w) / 3 for w in words] + ([0.0] if "bad" in item.name else [])
                        yield item, ctx.table({"word": words, "length": lengths}, decimals=2)
    """)
    archive = tmp_path / "in" / "words.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "to be, or not")
        zf.writestr("bad.txt", "x")
        zf.writestr("c.txt", 'say "hi"')
    # WHEN it runs through the instance's runner
    (manifest,) = run_local(package, [archive], tmp_path / "out", job_root=job_root)
    # THEN each table's rows are in results.csv and counted, and the bad table failed its item only
    assert (manifest["items"], manifest["items_succeeded"], manifest["items_failed"]) == (3, 2, 1)
    assert manifest["results_rows"] == 6
    files = job_files(tmp_path / "out", manifest)
    assert list(csv.reader((files / "results.csv").open(newline=""))) == [
        ["item", "word", "length"], ["a.txt", "to", "0.67"], ["a.txt", "be,", "1.00"], ["a.txt", "or", "0.67"],
        ["a.txt", "not", "1.00"], ["c.txt", "say", "1.00"], ["c.txt", '"hi"', "1.33"]]
    (error,) = [json.loads(line) for line in (files / "errors.jsonl").read_text().splitlines()]
    assert (error["item"], error["type"]) == ("bad.txt", "ValueError")
    assert error["message"] == "table columns differ in length (word=1, length=2): one value per row in every column"


def test_handler_prints_do_not_break_the_protocol(tmp_path, job_root):
    package = make_package(tmp_path / "pkg", """
        import sys
        class Job:
            def setup(self, ctx):
                print("{\\"event\\": \\"done\\"} from setup")

            def process(self, items, ctx):
                for item in items:
                    print("hello from process")
                    ctx.log.info("scored %s", item.name)
                    yield item, {"n": 1}
    """)
    (manifest,) = run_local(package, text_inputs(tmp_path, "a.txt"), tmp_path / "out", job_root=job_root)
    assert manifest["status"] == "succeeded", manifest["error"]
    log = (job_files(tmp_path / "out", manifest) / "job.log").read_text()
    assert "handler: scored a.txt" in log


def test_lease_heartbeat_writes_item_progress(monkeypatch):
    import time

    import boto3
    from moto import mock_aws

    from worker.lease import Heartbeat
    from worker.spec import Lease

    for name, value in {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        ddb.create_table(TableName="jobs", BillingMode="PAY_PER_REQUEST",
                         KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
                         AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}])
        ddb.put_item(TableName="jobs", Item={"job_id": {"S": "j-1"}, "status": {"S": "DISPATCHED"}})
        heartbeat = Heartbeat({"j-1": Lease("jobs", 1.5)}, client=ddb)
        heartbeat.set_progress("j-1", 3, 10)
        heartbeat.start()
        try:
            deadline = time.monotonic() + 10
            item: dict = {}
            while time.monotonic() < deadline and "items_done" not in item:
                time.sleep(0.1)
                item = ddb.get_item(TableName="jobs", Key={"job_id": {"S": "j-1"}})["Item"]
        finally:
            heartbeat.stop()
        assert (item["items_done"], item["items_total"]) == ({"N": "3"}, {"N": "10"})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
