"""GPU capacity outages for moto: StartInstances answers InsufficientInstanceCapacity in chosen AZs for a while.

moto always has capacity; AWS often has none for a GPU type in one Availability Zone. Installed in the
process that runs the local cloud's moto server; an outage is switched on from any process by writing
`<local dir>/faults/capacity.json` (`refuse_capacity`), and ends by itself at its deadline.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instances import InstanceBackend

FAULTS_DIR = "faults"
CAPACITY_FILE = "capacity.json"
_state: dict = {"path": None, "original": None}


def outage_path(local_dir: Path) -> Path:
    return local_dir / FAULTS_DIR / CAPACITY_FILE


def refuse_capacity(local_dir: Path, availability_zones: list[str], seconds: float) -> None:
    """From now on, for `seconds`, starts of instances in these AZs are refused (replaces any earlier outage)."""
    path = outage_path(local_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"availability_zones": sorted(availability_zones), "until": time.time() + seconds}))
    os.replace(tmp, path)


def short_zones(path: Path, now: float | None = None) -> set[str]:
    """The AZs out of capacity right now, per the outage file (none when it is missing, stale or unreadable)."""
    try:
        outage = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if (now or time.time()) >= float(outage.get("until", 0)):
        return set()
    return set(outage.get("availability_zones", []))


def install(local_dir: Path) -> None:
    """Patch moto's StartInstances in this process to honour the outage file of `local_dir`."""
    _state["path"] = outage_path(local_dir)
    if _state["original"] is not None:
        return
    original = _state["original"] = InstanceBackend.start_instances

    def start_instances(self, instance_ids):
        zones = short_zones(_state["path"])
        if zones:
            for instance in self.get_multi_instances_by_id(instance_ids):
                if instance.placement.zone in zones:
                    raise EC2ClientError(
                        "InsufficientInstanceCapacity",
                        f"We currently do not have sufficient {instance.instance_type} capacity in the Availability "
                        f"Zone you requested ({instance.placement.zone}) (a local cloud capacity outage).",
                    )
        return original(self, instance_ids)

    InstanceBackend.start_instances = start_instances


def uninstall() -> None:
    if _state["original"] is not None:
        InstanceBackend.start_instances = _state["original"]
    _state.update(path=None, original=None)
