"""Parsing of the ssh-endpoint parameter and the SSM look-ups of the SSH transport."""

from __future__ import annotations

import json

import paramiko
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from batchworker.transports.ssh import (
    InvalidEndpoint,
    PrivateKeyError,
    SshEndpoint,
    endpoint_parameter_name,
    fetch_endpoint,
    load_private_key,
)

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINN1VIVs6fSirC0lqoG3lyG0b+wXlY4AC8f9J6iR5JQY"
ECDSA = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHcnL69mJoUOsoUwjVc9lJL3ZQma"
    "mtRKDsrXIXDLWTWaKGwlXSZj7OlTDtmBwwmdNLKUv4ZWokY4fRNqFAeYOFo="
)


def parameter(**fields: object) -> str:
    return json.dumps({"host": "10.0.0.5", "port": 22, "host_key": ED25519, **fields})


def test_parses_the_published_json() -> None:
    endpoint = SshEndpoint.from_parameter(parameter(port=2222))

    assert endpoint == SshEndpoint(host="10.0.0.5", port=2222, host_key=ED25519)
    assert endpoint.public_key().get_name() == "ssh-ed25519"


def test_round_trips_through_to_parameter() -> None:
    endpoint = SshEndpoint(host="127.0.0.1", port=40001, host_key=ECDSA)

    assert SshEndpoint.from_parameter(endpoint.to_parameter()) == endpoint


def test_drops_the_key_comment() -> None:
    endpoint = SshEndpoint.from_parameter(parameter(host_key=f"  {ED25519}  root@ip-10-0-0-5\n"))

    assert endpoint.host_key == ED25519


@pytest.mark.parametrize(
    ("port", "name"), [(22, "10.0.0.5"), (2222, "[10.0.0.5]:2222")], ids=["default port", "other port"]
)
def test_known_hosts_name_follows_openssh(port: int, name: str) -> None:
    assert SshEndpoint(host="10.0.0.5", port=port, host_key=ED25519).known_hosts_name == name


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"port": 22, "host_key": ED25519}),
        parameter(host=""),
        parameter(port="22"),
        parameter(port=True),
        parameter(port=0),
        parameter(port=70000),
        parameter(host_key=None),
        parameter(host_key="ssh-ed25519"),
        parameter(host_key="ssh-dss AAAAB3NzaC1kc3MAAACBAP"),
        parameter(host_key="ssh-ed25519 not*base64"),
        parameter(host_key="ssh-ed25519 " + ECDSA.split()[1]),  # type and blob disagree
    ],
    ids=[
        "not json", "not an object", "no host", "empty host", "port as string", "port as bool",
        "port zero", "port too large", "no key", "key without blob", "unsupported type", "bad base64",
        "mismatched blob",
    ],
)
def test_rejects_malformed_parameters(text: str) -> None:
    with pytest.raises(InvalidEndpoint):
        SshEndpoint.from_parameter(text)


def test_parameter_name() -> None:
    assert endpoint_parameter_name("/batchworker", "i-0abc") == "/batchworker/instances/i-0abc/ssh-endpoint"
    assert endpoint_parameter_name("batchworker/", "i-0abc") == "/batchworker/instances/i-0abc/ssh-endpoint"


class FakeSsm:
    def __init__(self, parameters: dict[str, str]) -> None:
        self.parameters = parameters
        self.calls: list[dict] = []

    def get_parameter(self, **kwargs: object) -> dict:
        self.calls.append(kwargs)
        if kwargs["Name"] not in self.parameters:
            error = {"Error": {"Code": "ParameterNotFound", "Message": "not found"}}
            raise ClientError(error, "GetParameter")
        return {"Parameter": {"Name": kwargs["Name"], "Value": self.parameters[kwargs["Name"]]}}


def test_fetch_endpoint_reads_the_instance_parameter() -> None:
    ssm = FakeSsm({"/bw/instances/i-1/ssh-endpoint": parameter()})

    assert fetch_endpoint(ssm, "/bw", "i-1") == SshEndpoint.from_parameter(parameter())
    assert fetch_endpoint(ssm, "/bw", "i-2") is None


def test_fetch_endpoint_passes_other_errors_on() -> None:
    class Throttled(FakeSsm):
        def get_parameter(self, **kwargs: object) -> dict:
            raise ClientError({"Error": {"Code": "ThrottlingException"}}, "GetParameter")

    with pytest.raises(ClientError):
        fetch_endpoint(Throttled({}), "/bw", "i-1")


@pytest.mark.parametrize(
    ("private_key", "key_class"),
    [
        (ed25519.Ed25519PrivateKey.generate(), paramiko.Ed25519Key),
        (ec.generate_private_key(ec.SECP256R1()), paramiko.ECDSAKey),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), paramiko.RSAKey),
    ],
    ids=["ed25519", "ecdsa", "rsa"],
)
def test_load_private_key_reads_openssh_keys(private_key: object, key_class: type) -> None:
    text = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    ssm = FakeSsm({"/bw/ssh/private-key": text})

    key = load_private_key(ssm, "/bw/ssh/private-key")

    assert isinstance(key, key_class)
    assert ssm.calls == [{"Name": "/bw/ssh/private-key", "WithDecryption": True}]


@pytest.mark.parametrize("parameters", [{}, {"/bw/ssh/private-key": "garbage"}], ids=["missing", "garbage"])
def test_load_private_key_explains_what_is_wrong(parameters: dict[str, str]) -> None:
    with pytest.raises(PrivateKeyError, match="/bw/ssh/private-key"):
        load_private_key(FakeSsm(parameters), "/bw/ssh/private-key")
