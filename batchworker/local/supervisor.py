"""The local cloud's long-lived parent: moto server, terraform apply, Lambda runtime and instance hosts.

Started in the background by `batchworker local up`; stopped by SIGTERM from `batchworker local down`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from moto.server import ThreadedMotoServer

from batchworker.local import capacity_faults, ec2_events, gsi_lag, processes
from batchworker.local.paths import DEFAULT_JOB_PACKAGE, LAMBDA_BUILD_DIR, MODEL_PATH, SCRIPTS_DIR, VENV_BIN
from batchworker.local.state import LOCAL_CREDENTIALS, LOCAL_REGION, LocalOptions, read_state, write_state
from batchworker.local.terraform import LocalTerraform

logger = logging.getLogger("batchworker.local.supervisor")
# The instance hosts' look at their instance when no state change woke them (ec2_events wakes them at each
# one): a describe_instances costs ~5 ms of CPU, and every 0.2 s for four hosts was 10% of a core all along.
HOST_POLL_SECONDS = 1.0


class Supervisor:
    def __init__(self, local_dir: Path, cloud_id: str, options: LocalOptions):
        self.local_dir = local_dir
        self.cloud_id = cloud_id
        self.options = options
        self.children: list[subprocess.Popen] = []
        self.moto: ThreadedMotoServer | None = None
        self.state: dict = {"status": "starting", "pid": os.getpid(), "cloud_id": cloud_id, "phase": "starting"}
        self.stopping = threading.Event()

    def phase(self, text: str, **fields) -> None:
        logger.info(text)
        self.state.update(phase=text, **fields)
        write_state(self.local_dir, self.state)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - report any start failure to `local up`, then clean up
            logger.exception("local cloud failed to start")
            self.state.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            write_state(self.local_dir, self.state)
            self.shutdown()
            return 1
        self.phase("ready", status="ready")
        while not self.stopping.wait(0.5):
            for child in self.children:
                if child.poll() is not None:
                    logger.error("child %s exited with %s", child.args[:3], child.returncode)
                    self.stopping.set()
        self.shutdown()
        return 0

    def start(self) -> None:
        self.phase("building lambda zips and the model")
        self.build()
        capacity_faults.install(self.local_dir)  # outages switched on by writing faults/capacity.json
        # Instance state-change events, delivered to Lambda targets once the runtime is up; hosts woken at once
        ec2_events.install(self.local_dir / "instances")
        if self.options.gsi_lag_seconds > 0:
            gsi_lag.install(self.options.gsi_lag_seconds)  # the moto server runs in this process
            self.phase(f"GSI queries lag {self.options.gsi_lag_seconds:g}s behind writes")
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        endpoint = f"http://127.0.0.1:{self.moto._server.server_port}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION=LOCAL_REGION, AWS_REGION=LOCAL_REGION,
                          **LOCAL_CREDENTIALS)
        self.phase(f"moto server on {endpoint}", endpoint_url=endpoint, region=LOCAL_REGION)

        self.phase("terraform init + apply")
        terraform = LocalTerraform(self.local_dir / "terraform", self.terraform_variables())
        terraform.forget_state()  # a fresh moto server holds none of the old state's resources
        terraform.init()
        (self.local_dir / "logs" / "terraform-apply.log").write_text(terraform.apply())
        outputs = terraform.outputs()
        self.phase("terraform applied", outputs=outputs)

        key_file = self.publish_client_key(outputs["ssh_private_key_parameter"])
        self.phase("starting lambda runtime")
        runtime_dir = self.local_dir / "lambda-runtime"
        # A restart in the same folder: a ready file left by the last cloud must not pass for this one's.
        (runtime_dir / "lambda-runtime.json").unlink(missing_ok=True)
        runtime = processes.spawn(
            [sys.executable, "-m", "batchworker.local.lambda_runtime", "--code-dir", str(LAMBDA_BUILD_DIR),
             "--state-dir", str(runtime_dir), "--schedule-speedup", str(self.options.schedule_speedup)],
            self.local_dir / "logs" / "lambda-runtime.log",
        )
        self.children.append(runtime)
        hosts = []
        for instance_id in outputs["instance_ids"]:
            host_dir = self.local_dir / "instances" / instance_id
            (host_dir / "ready.json").unlink(missing_ok=True)
            host = processes.spawn(
                [sys.executable, "-m", "batchworker.local.instance_host", "--instance-id", instance_id,
                 "--parameter-prefix", outputs["parameter_prefix"], "--state-dir", str(host_dir),
                 "--boot-delay-seconds", str(self.options.boot_delay_seconds), "--authorized-key-file", str(key_file),
                 "--boot-command", json.dumps(self.boot_command(outputs)),
                 "--poll-interval-seconds", str(HOST_POLL_SECONDS)],
                self.local_dir / "logs" / f"instance-{instance_id}.log",
            )
            self.children.append(host)
            hosts.append((host, host_dir / "ready.json", instance_id))
        runtime_info = processes.wait_for_file(runtime_dir / "lambda-runtime.json", runtime, 120, "lambda runtime")
        ec2_events.deliver_to(runtime_info["invoke_url"])
        instance_info = {
            instance_id: processes.wait_for_file(ready, host, 60, f"instance host {instance_id}")
            for host, ready, instance_id in hosts
        }
        self.phase("children ready", lambda_invoke_url=runtime_info.get("invoke_url"), instance_hosts=instance_info)

    def boot_command(self, outputs: dict) -> list[str]:
        """What the instance's batchworker-prewarm unit runs at boot (terraform/templates/user_data.sh.tftpl)."""
        command = [str(VENV_BIN / "batchworker-job"), "prewarm",
                   "--packages-uri", f"s3://{outputs['artifacts_bucket']}/job-packages/",
                   "--instance-events-table", outputs["instance_events_table"]]
        if outputs.get("default_job"):
            command += ["--default-job", outputs["default_job"]]
        return command

    def build(self) -> None:
        """What `make build` does for the pipeline, so `local up` works from a fresh clone too."""
        for script in ("build_lambdas.py", "train_model.py"):
            subprocess.run([sys.executable, str(SCRIPTS_DIR / script)], check=True, stdout=sys.stderr)
        # The default job package ships the model trained above; Terraform uploads its bundle.
        weights = DEFAULT_JOB_PACKAGE / "weights" / MODEL_PATH.name
        if not weights.is_file() or weights.read_bytes() != MODEL_PATH.read_bytes():
            weights.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(MODEL_PATH, weights)
        subprocess.run([sys.executable, str(SCRIPTS_DIR / "bundle_default_job.py")], check=True, stdout=sys.stderr)

    def terraform_variables(self) -> dict:
        ec2 = boto3.client("ec2")
        images = ec2.describe_images(Filters=[{"Name": "name", "Values": ["Deep Learning AMI*"]}])["Images"]
        ami = images[0]["ImageId"]
        # Two AZs, as subnet_ids asks for on AWS: a capacity outage in one leaves the other.
        subnets = sorted(ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"],
                         key=lambda subnet: subnet["AvailabilityZone"])
        return {
            "subnet_ids": [subnet["SubnetId"] for subnet in subnets[:2]],
            "aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"],
            "region": LOCAL_REGION,
            "ami_id": ami,
            # moto answers every Get/Put on a TLS-only bucket with 403; AWS keeps the policy on.
            "tls_only_bucket_policy": False,
            # moto's own SQS event source mappings try to run functions in Docker; the local runtime polls.
            "event_source_mappings_enabled": False,
            # The local instance hosts speak SSH; moto's SSM Run Command records commands but runs nothing.
            "transport": "ssh",
            "job_command": f"{VENV_BIN / 'batchworker-job'} launch",
            "lambda_build_dir": str(LAMBDA_BUILD_DIR),
            **self.options.terraform_variables(),
        }

    def publish_client_key(self, parameter: str) -> Path:
        """The worker function's SSH login key: SecureString in SSM (as on AWS), public half to the hosts."""
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        boto3.client("ssm").put_parameter(Name=parameter, Value=private, Type="SecureString", Overwrite=True)
        key_file = self.local_dir / "keys" / "authorized_keys"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_bytes(public + b" batchworker-worker-lambda\n")
        return key_file

    def shutdown(self) -> None:
        self.phase("stopping")
        processes.terminate(list(reversed(self.children)))
        leftovers = processes.kill_marked(self.cloud_id)
        if leftovers:
            logger.warning("killed leftover processes %s", leftovers)
        if self.moto:
            self.moto.stop()
        self.state.update(status="stopped", phase="stopped", stopped_at=time.time())
        write_state(self.local_dir, self.state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--local-dir", type=Path, required=True)
    parser.add_argument("--options", type=LocalOptions.from_json, default=LocalOptions())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("werkzeug", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cloud_id = os.environ[processes.CLOUD_MARKER]
    previous = read_state(args.local_dir) or {}
    logger.info("starting (previous status %s)", previous.get("status"))
    return Supervisor(args.local_dir, cloud_id, args.options).run()


if __name__ == "__main__":
    sys.exit(main())
