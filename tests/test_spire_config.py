"""The lab's SPIRE choices that need no lab: what `up --workload-api` accepts, and the
SPIRE configuration netns_lab writes (parsed back, not compared as text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from netns_lab import Lab, Layout, spire
from netns_lab.errors import LabError


def test_the_identity_provider_and_its_svid_lifetime_are_checked_before_anything_runs(
        ) -> None:
    with pytest.raises(LabError, match="--workload-api must be one of lab, spire"):
        Lab(Layout("x", 1, 0), workload_api="spiffe")
    with pytest.raises(LabError, match="at least 30 seconds with SPIRE"):
        Lab(Layout("x", 1, 0), svid_ttl=10, workload_api="spire")
    assert Lab(Layout("x", 1, 0), svid_ttl=10, workload_api="lab").identity_prefix() == []
    with pytest.raises(LabError, match="at least 30 seconds with SPIRE"):
        Lab(Layout("x", 1, 0), svid_ttl=10)  # SPIRE is the default
    assert Lab(Layout("x", 1, 0), svid_ttl=120, workload_api="spire").identity_prefix() \
        == ["setpriv", f"--regid={spire.AGENT_GID}", "--clear-groups", "--"]


def _settings(text: str) -> dict[str, str]:
    return dict(re.findall(r'^\s*(\w+) = "([^"]*)"$', text, re.MULTILINE))


def test_configs_listen_only_on_the_lab_and_select_the_dedicated_gid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Layout, "spire_dir", property(lambda self: tmp_path / "spire"))
    lay = Layout("x", 2, 0)
    server = _settings(spire.write_server_config(lay, 120).read_text())
    assert server["bind_address"] == "10.77.0.9" and server["bind_port"] == "8081"
    assert server["default_x509_svid_ttl"] == "120s"
    assert server["database_type"] == "sqlite3"
    n2 = next(s for s in spire.agent_specs(lay) if s.who == "n2")
    agent = _settings(spire.write_agent_config(lay, n2, "tok-1").read_text())
    assert agent["socket_path"] == str(lay.node(2).spiffe_socket)
    assert agent["trust_bundle_path"] == str(spire.bundle_path(lay))
    assert agent["join_token"] == "tok-1" and "insecure_bootstrap" not in agent
    assert {s.who: s.spiffe_id for s in spire.agent_specs(lay)} == {
        "n1": "spiffe://lab.tfcrypt/tfcrypt/node/n1",
        "n2": "spiffe://lab.tfcrypt/tfcrypt/node/n2",
        "ctl": "spiffe://lab.tfcrypt/tfcrypt/controller"}
    with pytest.raises(LabError, match="quote"):
        spire.write_agent_config(lay, n2, 'tok"}')


def test_with_etcd_tls_spire_signs_under_the_lab_ca_etcd_trusts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography import x509

    from netns_lab import etcd_tls

    monkeypatch.setattr(Layout, "spire_dir", property(lambda self: tmp_path / "spire"))
    plain = _settings(spire.write_server_config(Layout("x", 1, 0), 120).read_text())
    assert "cert_file_path" not in plain  # SPIRE's own self-signed CA
    lay = Layout("x", 1, 0, etcd_tls=True)
    server = _settings(spire.write_server_config(lay, 120).read_text())
    upstream = x509.load_pem_x509_certificate(Path(server["cert_file_path"]).read_bytes())
    assert upstream == etcd_tls.issuer(lay).cert  # the root of etcd's trusted-ca-file
    assert Path(server["key_file_path"]).stat().st_mode & 0o077 == 0
