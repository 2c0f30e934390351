"""The lab Workload API server, driven as a real subprocess through real clients.

Every test starts `python -m lab_workload_api serve` with its own config in a fresh temp
dir (short path: Unix socket addresses are limited to 107 bytes) and stops it by PID in a
finally. py-spiffe is the client a workload would use; a raw gRPC channel is used where
py-spiffe always adds the security header. No root needed.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store
from lab_workload_api.identities import rotation_delay
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import TrustDomain
from spiffe.workloadapi.errors import FetchX509BundleError, FetchX509SvidError
from wlapi_server import N1, TD, Server, server_config

HEADER = (("workload.spiffe.io", "true"),)
RPC_TIMEOUT = 5.0


@pytest.fixture
def make_server(workdir: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(ttl: float = 300) -> Server:
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(server_config(workdir, ttl)))
        server = Server(workdir, config_path)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()


def _client(path: Path) -> WorkloadApiClient:
    return WorkloadApiClient(socket_path=f"unix:{path}")


def _verify_svid(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                 ca: x509.Certificate) -> None:
    """The X509-SVID checks a tfcrypt reader makes: chain to the bundle, then leaf rules."""
    verifier = (
        PolicyBuilder().store(Store([ca]))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier())
    verifier.verify(leaf, intermediates)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(san.get_values_for_type(x509.UniformResourceIdentifier)) == 1
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def _only_ca(bundle_set: Any) -> x509.Certificate:
    bundle = bundle_set.get_bundle_for_trust_domain(TrustDomain(TD))
    assert bundle is not None
    (ca,) = bundle.x509_authorities
    return ca


def test_fetch_x509_svid_is_registered_identity_and_validates(make_server: Any) -> None:
    server = make_server()
    client = _client(server.sock("n1"))
    try:
        svid = client.fetch_x509_svid(timeout=RPC_TIMEOUT)
        bundles = client.fetch_x509_bundles(timeout=RPC_TIMEOUT)
        context = client.fetch_x509_context(timeout=RPC_TIMEOUT)
    finally:
        client.close()
    assert str(svid.spiffe_id) == N1
    ca = _only_ca(bundles)
    assert _only_ca(context.x509_bundle_set) == ca
    _verify_svid(svid.leaf, svid.cert_chain[1:], ca)
    log = server.log()
    assert f"svid issued spiffe_id={N1} serial={svid.leaf.serial_number:x}" in log
    assert "PRIVATE KEY" not in log


def test_rotation_reaches_an_open_stream_twice(make_server: Any) -> None:
    ttl = 6.0
    wait = ttl * 0.6 + 3.0
    server = make_server(ttl=ttl)
    client = _client(server.sock("n1"))
    updates: queue.Queue[Any] = queue.Queue()
    errors: list[Exception] = []
    # retry_connect=False: if the server ended the stream, py-spiffe would report an
    # error and stop, so three updates prove the one stream stayed open.
    handler = client.stream_x509_contexts(updates.put, errors.append, retry_connect=False)
    try:
        serials = []
        for _ in range(3):
            context = updates.get(timeout=wait if serials else RPC_TIMEOUT)
            svid = context.default_svid
            assert str(svid.spiffe_id) == N1
            _verify_svid(svid.leaf, svid.cert_chain[1:], _only_ca(context.x509_bundle_set))
            serials.append(svid.leaf.serial_number)
    finally:
        handler.cancel()
        client.close()
    assert len(set(serials)) == 3
    assert errors == []
    assert server.log().count("stream opened method=FetchX509SVID") == 1


@pytest.mark.parametrize("call", ["FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"])
def test_request_without_security_header_is_invalid_argument(
        make_server: Any, call: str) -> None:
    server = make_server()
    requests = {"FetchX509SVID": workload_pb2.X509SVIDRequest(),
                "FetchX509Bundles": workload_pb2.X509BundlesRequest(),
                "FetchJWTBundles": workload_pb2.JWTBundlesRequest()}
    with grpc.insecure_channel(f"unix:{server.sock('n1')}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(getattr(stub, call)(requests[call], timeout=RPC_TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_jwt_methods_are_unimplemented(make_server: Any) -> None:
    server = make_server()
    with grpc.insecure_channel(f"unix:{server.sock('n1')}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]),
                              metadata=HEADER, timeout=RPC_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_socket_without_identity_is_permission_denied(make_server: Any) -> None:
    server = make_server()
    with grpc.insecure_channel(f"unix:{server.sock('x')}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        for call in (stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER,
                                        timeout=RPC_TIMEOUT),
                     stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(),
                                           metadata=HEADER, timeout=RPC_TIMEOUT)):
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    client = _client(server.sock("x"))
    try:
        with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
            client.fetch_x509_svid(timeout=RPC_TIMEOUT)
        with pytest.raises(FetchX509BundleError, match="PERMISSION_DENIED"):
            client.fetch_x509_bundles(timeout=RPC_TIMEOUT)
    finally:
        client.close()


def test_restart_with_same_state_dir_keeps_the_bundle(make_server: Any) -> None:
    def fetch(server: Server) -> tuple[x509.Certificate, int]:
        client = _client(server.sock("n1"))
        try:
            context = client.fetch_x509_context(timeout=RPC_TIMEOUT)
        finally:
            client.close()
        return _only_ca(context.x509_bundle_set), context.default_svid.leaf.serial_number

    first = make_server()
    ca_before, serial_before = fetch(first)
    assert first.stop() == 0
    second = make_server()
    ca_after, serial_after = fetch(second)
    assert ca_after == ca_before
    assert serial_after != serial_before


def test_sigterm_ends_streams_and_removes_sockets_and_ready_file(make_server: Any) -> None:
    server = make_server()
    client = _client(server.sock("n1"))
    updates: queue.Queue[Any] = queue.Queue()
    handler = client.stream_x509_contexts(updates.put, lambda e: None, retry_connect=False)
    try:
        updates.get(timeout=RPC_TIMEOUT)
        assert stat_mode(server.sock("n1")) & 0o007 == 0
        assert server.stop(signal.SIGTERM) == 0
    finally:
        handler.cancel()
        client.close()
    assert not server.sock("n1").exists()
    assert not server.sock("x").exists()
    assert not server.ready.exists()
    assert "stream closed method=FetchX509SVID" in server.log()


def test_sockets_left_by_a_killed_server_are_replaced(make_server: Any) -> None:
    server = make_server()
    server.kill()
    assert server.sock("n1").exists()
    restarted = make_server()
    client = _client(restarted.sock("n1"))
    try:
        assert str(client.fetch_x509_svid(timeout=RPC_TIMEOUT).spiffe_id) == N1
    finally:
        client.close()


def _run_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab_workload_api", "serve", "--config", str(config_path)],
        capture_output=True, text=True, timeout=30)


def test_second_instance_refuses_and_leaves_the_first_serving(make_server: Any) -> None:
    first = make_server()
    result = _run_cli(first.config_path)
    assert result.returncode == 1
    assert "another server is listening" in result.stderr
    assert first.ready.read_text() == str(first.proc.pid)
    client = _client(first.sock("n1"))
    try:
        assert str(client.fetch_x509_svid(timeout=RPC_TIMEOUT).spiffe_id) == N1
    finally:
        client.close()


def test_non_socket_file_at_socket_path_is_left_alone(workdir: Path) -> None:
    path = workdir / "config.json"
    path.write_text(json.dumps(server_config(workdir, 300)))
    (workdir / "x.sock").write_text("precious")
    result = _run_cli(path)
    assert result.returncode == 1
    assert "x.sock: exists and is not a socket" in result.stderr
    assert (workdir / "x.sock").read_text() == "precious"
    assert not (workdir / "n1.sock").exists()


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize(("change", "key"), [
    ({"trust_domain": "Lab TD"}, "trust_domain"),
    ({"svid_ttl_seconds": -1}, "svid_ttl_seconds"),
    ({"state_dir": "relative/dir"}, "state_dir"),
    ({"identities": []}, "identities"),
    ({"identities": [{"socket": "/tmp/a.sock", "spiffe_id": "spiffe://other.td/x"}]},
     "identities[0].spiffe_id"),
    ({"identities": [{"spiffe_id": None}]}, "identities[0].socket"),
    ({"extra": 1}, "extra"),
])
def test_bad_config_exits_2_naming_the_key(workdir: Path, change: dict[str, Any],
                                           key: str) -> None:
    config = server_config(workdir, 300) | change
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    result = _run_cli(path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"config error: {key}:" in lines[0]
    assert not (workdir / "state").exists()


def test_rotation_is_scheduled_at_half_life_plus_up_to_ten_percent() -> None:
    delays = [rotation_delay(100.0, random.Random(seed)) for seed in range(200)]
    assert all(50.0 <= d <= 60.0 for d in delays)
    assert max(delays) - min(delays) > 5.0
