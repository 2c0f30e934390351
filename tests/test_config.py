"""Configuration: precedence flags > env > file > defaults, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tfcrypt.cli import build_parser, main
from tfcrypt.config import KEYS, AgentConfig, agent_config, resolve, unknown_env
from tfcrypt.errors import ConfigError
from tfcrypt.marks import foreign_clashes

NEEDED = {"advertise_address": "10.77.0.11", "node_name": "n1"}

# One invalid value per key (as YAML text, as typed), and what the error must say.
BAD = {
    "node_name": ("Node_1", "is not a valid node name"),
    "advertise_address": ("10.0.0.300", "is not an IP address"),
    "etcd": ("not a url", "is not host:port"),
    "etcd_tls": ("sometimes", "'sometimes' is not true or false"),
    "etcd_server_name": ("etcd server", "is not a DNS name"),
    "spiffe_socket": ("relative/agent.sock", "is not an absolute path"),
    "interface": ("a-name-longer-than-15", "is not a valid interface name"),
    "listen_port": ("70000", "70000 is not in 1..65535"),
    "backend": ("ebpf", "'ebpf' is not one of userspace, kernel"),
    "state_dir": ("var/lib/tfcrypt", "is not an absolute path"),
    "prefix": ("/tfcrypt/v1/", "must start and not end with '/'"),
    "mark": ("0x3", "must be a single bit"),
    "mark_mask": ("0x100000000", "is not a 32-bit mask"),
    "allow_foreign_mark_bits": ("maybe", "'maybe' is not true or false"),
    "route_table": ("254", "must be free table ids"),
    "rule_priority": ("40000", "40000 is not in 1..32764"),
    "lease_ttl": ("2", "2 is not in 5..3600"),
    "resync_interval": ("soon", "'soon' is not a number"),
    "mtu": ("9", "9 is not in 1280..65535"),
    "persistent_keepalive": ("-1", "-1 is not in 0..65535"),
    "workload_grace": ("3601", "3601.0 is not in 0..3600"),
    "node_id_template": ("spiffe://td/node", "must be a spiffe:// ID containing {node}"),
    "controller_ids": ("https://controller", "is not a spiffe:// ID"),
    "status_socket": ("/run/" + "x" * 120, "longer than a Unix socket path"),
    "metrics_address": ("localhost", "is not IP:PORT"),
    "etcd_grace": ("-1", "-1.0 is not in 0..86400"),
    "log_format": ("xml", "'xml' is not one of text, json"),
    "log_level": ("verbose", "'verbose' is not one of debug, info, warning, error"),
    "wireguard_log": ("wg.log", "is not an absolute path"),
    "wireguard_go": ("bin/wireguard-go", "is neither a program name (looked up on PATH) nor "
                                         "an absolute path"),
    "infrastructure_cidrs": ("10.96.0.0/33", "'10.96.0.0/33' is not an address or CIDR"),
    "flows": ("sometimes", "'sometimes' is not true or false"),
    "flows_interval": ("0.5", "0.5 is not in 1..60"),
    "flows_publish_interval": ("1", "1.0 is not in 5..3600"),
    "flows_max_records": ("10", "10 is not in 100..1000000"),
    "flows_retention": ("30", "30.0 is not in 60..604800"),
    "flows_set_size": ("100", "100 is not in 1024..1048576"),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tfcrypt.yaml"
    path.write_text(text)
    return path


def test_every_key_has_an_invalid_example() -> None:
    assert set(BAD) == {k.name for k in KEYS}


@pytest.mark.parametrize(("values", "want"), [
    ({"etcd": "https://10.0.0.1:2379"}, "set etcd_tls (--etcd-tls)"),
    ({"etcd": "http://10.0.0.1:2379", "etcd_tls": "true"}, "is http:// but etcd_tls is set"),
    ({"etcd_server_name": "etcd.example"}, "only meaningful with etcd_tls"),
])
def test_etcd_tls_and_the_endpoint_schemes_must_agree(values: dict[str, str],
                                                      want: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(want)):
        agent_config({**NEEDED, **values}, {}, None)


def test_etcd_tls_accepts_https_and_bare_endpoints() -> None:
    cfg = agent_config({**NEEDED, "etcd": "https://10.0.0.1:2379,10.0.0.2:2379",
                        "etcd_tls": "yes", "etcd_server_name": "etcd.lab.tfcrypt"}, {}, None)
    assert cfg.etcd_tls and cfg.etcd_server_name == "etcd.lab.tfcrypt"


@pytest.mark.parametrize(("flag", "env", "file", "want"), [
    (None, None, None, 51820),
    (None, None, "1001", 1001),
    (None, "1002", "1001", 1002),
    ("1003", "1002", "1001", 1003),
    ("1003", None, None, 1003),
    ("1003", None, "1001", 1003),
    (None, "1002", None, 1002),
])
def test_precedence_is_flags_then_env_then_file_then_defaults(
        tmp_path: Path, flag: str | None, env: str | None, file: str | None, want: int) -> None:
    path = write(tmp_path, f"listen_port: {file}\n") if file else None
    cfg = agent_config({**NEEDED, "listen_port": flag},
                       {"TFCRYPT_LISTEN_PORT": env} if env else {}, path)
    assert cfg.listen_port == want


def test_layers_combine_key_by_key(tmp_path: Path) -> None:
    path = write(tmp_path, "interface: wgfile\nlease_ttl: 30\netcd: [http://e1:2379, e2:2379]\n"
                           "log_format: json\n")
    cfg = agent_config({**NEEDED, "interface": "wgflag"},
                       {"TFCRYPT_LEASE_TTL": "20", "TFCRYPT_MARK": "0x20"}, path)
    assert (cfg.interface, cfg.lease_ttl, cfg.log_format) == ("wgflag", 20, "json")
    assert cfg.etcd_endpoints == ("http://e1:2379", "e2:2379")
    assert (cfg.mark, cfg.mark_mask) == (0x20, 0x20)  # the mask defaults to the mark


def test_defaults_need_only_what_has_no_default() -> None:
    cfg = agent_config(NEEDED, {}, None)
    assert cfg == AgentConfig(node_name="n1", advertise_address="10.77.0.11")
    assert (cfg.status_socket, cfg.metrics_address) == ("/run/tfcrypt/agent.sock", None)
    with pytest.raises(ConfigError, match=r"^advertise_address: required .*"
                                          r"--advertise-address, TFCRYPT_ADVERTISE_ADDRESS"):
        agent_config({"node_name": "n1"}, {}, None)


@pytest.mark.parametrize("key", sorted(BAD))
def test_an_invalid_value_from_the_file_names_the_file_and_key(tmp_path: Path, key: str) -> None:
    value, why = BAD[key]
    path = write(tmp_path, f"{key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        agent_config(NEEDED if key not in NEEDED else {}, {}, path)
    assert str(err.value).startswith(f"{path}: {key}: "), err.value
    assert why in str(err.value)


@pytest.mark.parametrize("key", sorted(BAD))
def test_an_invalid_value_from_env_or_flag_names_the_variable_or_option(key: str) -> None:
    spec = next(k for k in KEYS if k.name == key)
    value, why = BAD[key]
    with pytest.raises(ConfigError) as err:
        agent_config({**NEEDED, key: None}, {spec.env: value}, None)
    assert str(err.value).startswith(f"{spec.env}: ") and why in str(err.value)
    with pytest.raises(ConfigError) as err:
        agent_config({**NEEDED, key: value}, {}, None)
    assert str(err.value).startswith(f"{spec.option}: ") and why in str(err.value)


def test_listen_port_message_is_exactly_as_documented(tmp_path: Path) -> None:
    path = write(tmp_path, "listen_port: 70000\n")
    with pytest.raises(ConfigError) as err:
        agent_config(NEEDED, {}, path)
    assert str(err.value) == f"{path}: listen_port: 70000 is not in 1..65535"


def test_workload_grace_takes_seconds_from_every_layer_and_refuses_a_negative_value(
        tmp_path: Path) -> None:
    assert agent_config(NEEDED, {}, None).workload_grace == 30.0
    assert agent_config(NEEDED, {}, write(tmp_path, "workload_grace: 0\n")).workload_grace == 0
    assert agent_config(NEEDED, {"TFCRYPT_WORKLOAD_GRACE": "2.5"}, None).workload_grace == 2.5
    assert agent_config({**NEEDED, "workload_grace": "90"}, {}, None).workload_grace == 90
    with pytest.raises(ConfigError) as err:
        agent_config(NEEDED, {}, write(tmp_path, "workload_grace: -5\n"))
    assert str(err.value) == f"{tmp_path / 'tfcrypt.yaml'}: workload_grace: -5.0 is not in 0..3600"
    with pytest.raises(ConfigError, match=r"^--workload-grace: 'soon' is not a number$"):
        agent_config({**NEEDED, "workload_grace": "soon"}, {}, None)


def test_a_mask_without_the_mark_names_mark_mask(tmp_path: Path) -> None:
    path = write(tmp_path, "mark: 0x100\nmark_mask: 0xff\n")
    with pytest.raises(ConfigError, match=r"tfcrypt.yaml: mark_mask: 0xff must contain "
                                          r"the mark 0x100"):
        agent_config(NEEDED, {}, path)
    with pytest.raises(ConfigError, match=r"^--mark-mask: 0xf must contain"):
        agent_config({**NEEDED, "mark_mask": "0xf"}, {}, None)


@pytest.mark.parametrize(("text", "why"), [
    ("listen_prot: 51820\n", "listen_prot: unknown key (did you mean listen_port?)"),
    ("colour: blue\n", "colour: unknown key"),
    ("- listen_port\n", "must be a mapping"),
    ("listen_port: [\n", "not valid YAML"),
])
def test_unknown_keys_and_malformed_files_are_refused(tmp_path: Path, text: str,
                                                      why: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        agent_config(NEEDED, {}, path)
    assert str(err.value).startswith(f"{path}: ") and why in str(err.value)


def test_a_value_of_the_wrong_type_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"wireguard_log: \[1, 2\] is not a string"):
        agent_config(NEEDED, {}, write(tmp_path, "wireguard_log: [1, 2]\n"))
    with pytest.raises(ConfigError, match=r"listen_port: True is not an integer"):
        agent_config(NEEDED, {}, write(tmp_path, "listen_port: yes\n"))


def test_an_empty_file_means_defaults_and_a_missing_file_is_an_error(tmp_path: Path) -> None:
    assert agent_config(NEEDED, {}, write(tmp_path, "")).listen_port == 51820
    with pytest.raises(ConfigError, match="cannot read the config file"):
        agent_config(NEEDED, {}, tmp_path / "absent.yaml")


def test_unknown_environment_variables_are_reported_not_refused() -> None:
    env = {"TFCRYPT_LISTEN_PROT": "1", "TFCRYPT_CONFIG": "/x", "TFCRYPT_ETCD": "a:1",
           "HOME": "/root"}
    assert unknown_env(env) == ["TFCRYPT_LISTEN_PROT"]
    assert agent_config(NEEDED, env, None).etcd_endpoints == ("a:1",)


def test_a_partial_resolve_validates_only_its_keys_but_still_refuses_unknown_ones(
        tmp_path: Path) -> None:
    path = write(tmp_path, "status_socket: /run/x.sock\nlisten_port: 70000\n")
    assert resolve({}, {}, path, ["status_socket"])["status_socket"] == "/run/x.sock"
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        resolve({}, {}, write(tmp_path, "bogus: 1\n"), ["status_socket"])


def test_the_cli_exits_2_with_one_line_naming_the_key(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "listen_port: 70000\n")
    monkeypatch.delenv("TFCRYPT_LISTEN_PORT", raising=False)
    assert main(["agent", "--config", str(path), "--advertise-address", "10.0.0.1"]) == 2
    assert capsys.readouterr().err == f"tfcrypt: {path}: listen_port: 70000 is not in 1..65535\n"
    monkeypatch.setenv("TFCRYPT_BACKEND", "ebpf")
    assert main(["agent", "--advertise-address", "10.0.0.1"]) == 2
    assert capsys.readouterr().err.startswith("tfcrypt: TFCRYPT_BACKEND: 'ebpf' is not one of")


# -- the file is read strictly and within bounds (issue #14 item 5; tfcrypt.safeyaml) -----

LAUGHS = "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)) + "mark: *a9\n"


@pytest.mark.parametrize(("content", "problem"), [
    (b"mark: 0x10\nmark: 0x20\n", "not valid YAML (line 2, column 1): duplicate key 'mark'"),
    (LAUGHS.encode(), "not valid YAML (line 6, column 5): more than 200000 nodes once "
                      "aliases are expanded"),
    (b"backend: kernel\n" + b"#" * (1 << 20), "the config file is larger than 1048576 "
                                               "bytes: refused"),
    (b"node_name: n\xe91\n", "the config file is not UTF-8 text (byte 0xe9 at offset 12)"),
])
def test_duplicates_aliases_oversize_and_non_utf8_files_are_one_line_errors(
        tmp_path: Path, content: bytes, problem: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tfcrypt.yaml"
    path.write_bytes(content)
    for key in KEYS:
        monkeypatch.delenv(key.env, raising=False)
    # --listen-port 0 is refused too, after the file: code that accepted the file would
    # report it, and never start an agent
    assert main(["agent", "--config", str(path), "--advertise-address", "10.0.0.1",
                 "--listen-port", "0"]) == 2
    assert capsys.readouterr().err == f"tfcrypt: {path}: {problem}\n"


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match=r"--state-dir: '.*afile' exists and is not a "
                                          r"directory"):
        agent_config({**NEEDED, "state_dir": str(afile)}, {})
    assert main(["keys", "show", "--state-dir", str(afile)]) == 2
    assert capsys.readouterr().err == (f"tfcrypt: --state-dir: '{afile}' exists and is not a "
                                       "directory\n")


# -- mark bits other tools own (issue #14 item 6; tfcrypt.marks) -------------------------

@pytest.mark.parametrize(("flags", "error"), [
    ({"mark": "0x4000"}, "--mark: 0x4000 overlaps bits another tool uses: 0x4000 is "
                         "kube-proxy's (masquerade bit"),
    ({"mark": "0x20", "mark_mask": "0xffffffff"},
     "--mark-mask: 0xffffffff overlaps bits another tool uses: 0x4000 is kube-proxy's "
     "(masquerade bit, KUBE-MARK-MASQ 0x4000); 0x8000 is kube-proxy's (drop bit"),
    ({"mark": "0x00200000"}, "--mark: 0x200000 overlaps bits another tool uses: 0x200000 "
                             "is Calico's (default FELIX_IPTABLESMARKMASK 0xffff0000)"),
    ({"mark": "0x800"}, "--mark: 0x800 overlaps bits another tool uses: 0x800 is "
                        "Cilium's (magic marks"),
])
def test_mark_bits_another_tool_owns_are_refused_naming_the_tool(
        flags: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        agent_config({**NEEDED, **flags}, {})
    assert str(info.value).startswith(error)
    cfg = agent_config({**NEEDED, **flags, "allow_foreign_mark_bits": True}, {})
    assert cfg.allow_foreign_mark_bits and cfg.mark == int(flags["mark"], 16)


def test_the_override_is_a_flag_an_env_variable_and_a_file_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "mark: 0x4000\n")
    with pytest.raises(ConfigError, match=r"tfcrypt\.yaml: mark: 0x4000 overlaps"):
        agent_config(NEEDED, {}, path)
    assert agent_config(NEEDED, {"TFCRYPT_ALLOW_FOREIGN_MARK_BITS": "true"}, path).mark == 0x4000
    path = write(tmp_path, "mark: 0x4000\nallow_foreign_mark_bits: true\n")
    assert agent_config(NEEDED, {}, path).mark == 0x4000
    assert main(["agent", "--mark", "0x8000", "--advertise-address", "10.0.0.1"]) == 2
    assert "0x8000 is kube-proxy's (drop bit" in capsys.readouterr().err
    args = build_parser().parse_args(["agent", "--allow-foreign-mark-bits"])
    assert args.allow_foreign_mark_bits is True


def test_the_default_mark_lies_in_calicos_default_mask_and_is_kept() -> None:
    """Reported in #14: refusing it would refuse every default install."""
    cfg = agent_config(NEEDED, {})
    assert (cfg.mark, cfg.mark_mask) == (0x00100000, 0x00100000)
    assert foreign_clashes(cfg.mark_mask) == [
        "0x100000 is Calico's (default FELIX_IPTABLESMARKMASK 0xffff0000)"]


def test_infrastructure_cidrs_come_from_every_layer_and_repeated_flags(tmp_path: Path) -> None:
    from tfcrypt.agent.infrastructure import etcd_hosts, static_infrastructure
    from tfcrypt.cli import build_parser

    assert agent_config(NEEDED, {}, None).infrastructure_cidrs == ()
    path = write(tmp_path, "infrastructure_cidrs: [10.96.0.0/12, 10.77.0.5]\n")
    assert agent_config(NEEDED, {}, path).infrastructure_cidrs == ("10.96.0.0/12", "10.77.0.5")
    env = {"TFCRYPT_INFRASTRUCTURE_CIDRS": "10.96.0.1,fd00:96::/64"}
    assert agent_config(NEEDED, env, path).infrastructure_cidrs == ("10.96.0.1", "fd00:96::/64")
    args = build_parser().parse_args(["agent", "--infrastructure-cidr", "10.96.0.0/12",
                                      "--infrastructure-cidr", "192.0.2.7"])
    flags = {**NEEDED, "infrastructure_cidrs": args.infrastructure_cidrs}
    cfg = agent_config(flags, env, path)
    assert cfg.infrastructure_cidrs == ("10.96.0.0/12", "192.0.2.7")
    cfg = agent_config({**flags, "etcd": "http://10.77.0.2:2379,[fd00:77::2]:2379"}, {}, None)
    assert etcd_hosts(cfg.etcd_endpoints) == ["10.77.0.2", "fd00:77::2"]
    assert static_infrastructure(cfg) == {
        "10.96.0.0/12": "configured", "192.0.2.7": "configured", "10.77.0.11": "node address",
        "10.77.0.2": "etcd endpoint", "fd00:77::2": "etcd endpoint"}


@pytest.mark.parametrize(("argv", "env", "want"), [
    (["--etcd", "https://10.0.0.1:2379"], {}, "is https://: set etcd_tls (--etcd-tls)"),
    (["--etcd", "http://10.0.0.1:2379", "--etcd-tls"], {}, "is http:// but etcd_tls is set"),
    (["--etcd", "http://10.0.0.1:2379"], {"TFCRYPT_ETCD_TLS": "true"},
     "is http:// but etcd_tls is set"),
    ([], {"TFCRYPT_ETCD_TLS": "maybe"}, "TFCRYPT_ETCD_TLS: 'maybe' is not true or false"),
    (["--etcd-server-name", "etcd.example"], {}, "only meaningful with etcd_tls"),
])
def test_controller_commands_check_etcd_tls_before_connecting(
        argv: list[str], env: dict[str, str], want: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["policy", "list", *argv]) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1, err


# -- which wireguard-go the userspace backend starts (issue #18 item 1) -------------------

def test_wireguard_go_comes_from_every_layer_and_defaults_to_the_one_on_path(
        tmp_path: Path) -> None:
    build = tmp_path / "wireguard-go"
    build.write_text("#!/bin/sh\n")
    build.chmod(0o755)
    assert agent_config(NEEDED, {}).wireguard_go == "wireguard-go"  # Debian's, on PATH
    assert agent_config({**NEEDED, "wireguard_go": str(build)}, {}).wireguard_go == str(build)
    assert agent_config(NEEDED, {"TFCRYPT_WIREGUARD_GO": str(build)}).wireguard_go == str(build)
    path = write(tmp_path, f"wireguard_go: {build}\n")
    assert agent_config(NEEDED, {}, path).wireguard_go == str(build)
    args = build_parser().parse_args(["agent", "--wireguard-go", str(build)])
    assert args.wireguard_go == str(build)


def test_a_wireguard_go_that_cannot_run_is_refused_naming_it_and_where_it_was_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the agent touches anything, not as a failed start loop later; a
    kernel-backend node does not run wireguard-go, so it is not checked there."""
    plain = tmp_path / "not-executable"
    plain.write_text("")
    missing = tmp_path / "missing"
    for value, why in ((str(missing), f"'{missing}' does not exist"),
                       (str(plain), f"'{plain}' is not executable"),
                       (str(tmp_path), f"'{tmp_path}' is not a file"),
                       ("wireguard-go-nowhere", "'wireguard-go-nowhere' is not on PATH")):
        with pytest.raises(ConfigError) as err:
            agent_config({**NEEDED, "wireguard_go": value}, {})
        assert str(err.value) == (f"--wireguard-go: {why} (the userspace backend runs it; "
                                  "set wireguard_go, docs/wireguard.md)")
        with pytest.raises(ConfigError, match=f"^TFCRYPT_WIREGUARD_GO: {re.escape(why)}"):
            agent_config(NEEDED, {"TFCRYPT_WIREGUARD_GO": value})
        cfg = agent_config({**NEEDED, "wireguard_go": value, "backend": "kernel"}, {})
        assert cfg.wireguard_go == value
    monkeypatch.setenv("PATH", str(tmp_path))  # no wireguard-go on PATH: the default fails
    with pytest.raises(ConfigError, match=r"^wireguard_go: 'wireguard-go' is not on PATH"):
        agent_config(NEEDED, {})
    monkeypatch.delenv("TFCRYPT_WIREGUARD_GO", raising=False)
    assert main(["agent", "--advertise-address", "10.0.0.1", "--wireguard-go",
                 str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"tfcrypt: --wireguard-go: '{missing}' does not "
                                              "exist")
