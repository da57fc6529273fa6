"""The lab cluster as deployed by ansible/playbooks/site.yml, checked on the hosts (testinfra,
through ``podman exec``) and from the controller: a teia peer joins through the deployed
discovery node, deposits and fetches through the deployed store nodes (and loses nothing to a
rolling restart), and allocates on the deployed relay.

The controller only ever addresses the containers of this scenario, on the podman network the
scenario created (``teia-lab``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import anyio

from teia.dht.core import Mode
from teia.dht.node import DhtNode
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId
from teia.relay.auth import rest_password
from teia.relay.client import AllocationCreated, AllocationFailed, TurnClient
from teia.store import Envelope, Status, StoreClient, inbox_for

REPO = Path(__file__).resolve().parents[4]
INVENTORY = REPO / "inventories" / "lab"
NETWORK = "teia-lab"
PORTS = {"discovery": [("udp", 4001)], "relay": [("udp", 3478), ("tcp", 3478)],
         "store": [("udp", 4003)]}  # fmt: skip
METRICS = {"discovery": 9464, "relay": 9465, "store": 9466}
TIMEOUT = 60


def service_of(host: Any) -> str:
    return str(host.backend.get_hostname()).split("-")[2]  # teia-lab-<service>-<n>


def lab_address(name: str) -> str:
    """The container's address on the scenario's own network (and only that one)."""
    inspected = json.loads(subprocess.check_output(["podman", "inspect", name]))
    return str(inspected[0]["NetworkSettings"]["Networks"][NETWORK]["IPAddress"])


def lab_hosts(service: str) -> list[str]:
    names = subprocess.check_output(
        ["podman", "ps", "--format", "{{.Names}}", "--filter", f"name=teia-lab-{service}-"],
        text=True,
    )
    return sorted(names.split())


def peer_id_of(name: str, service: str) -> PeerId:
    out = subprocess.check_output(
        ["podman", "exec", name, "runuser", "-u", "teia", "--", "/opt/teia/venv/bin/teia",
         service, "--config", f"/etc/teia/{service}.toml", "--print-peer-id"],
        text=True,
    )  # fmt: skip
    return PeerId.from_string(out.strip())


def journal(host: Any, unit: str) -> str:
    return str(host.run(f"journalctl -u {unit} --no-pager -n 50").stdout)


# --- on the hosts ---------------------------------------------------------------------------


def test_unit_active_enabled_and_hardened(host: Any) -> None:
    service = service_of(host)
    unit = f"teia-{service}.service"
    svc = host.service(unit)
    assert svc.is_running, journal(host, unit)
    assert svc.is_enabled
    shown = dict(
        line.split("=", 1)
        for line in host.check_output(
            f"systemctl show {unit} -p User -p NoNewPrivileges -p ProtectSystem -p ProtectHome "
            "-p PrivateTmp -p CapabilityBoundingSet -p Restart -p MainPID"
        ).splitlines()
    )
    assert shown["User"] == "teia"
    assert shown["NoNewPrivileges"] == "yes"
    assert shown["ProtectSystem"] == "strict"
    assert shown["ProtectHome"] == "yes"
    assert shown["PrivateTmp"] == "yes"
    assert shown["CapabilityBoundingSet"] == ""
    assert shown["Restart"] == "on-failure"
    # In effect, not only configured: the process has no capabilities, cannot gain any, and
    # sees the system read-only.
    pid = shown["MainPID"]
    status = host.file(f"/proc/{pid}/status").content_string
    assert "NoNewPrivs:\t1" in status
    assert "CapBnd:\t0000000000000000" in status
    root_mount = [
        line.split() for line in host.file(f"/proc/{pid}/mountinfo").content_string.splitlines()
    ]
    assert any(f[4] == "/" and f[5].startswith("ro") for f in root_mount)
    assert host.process.get(pid=int(pid)).user == "teia"


def test_ports_listening_and_only_those_open(host: Any) -> None:
    service = service_of(host)
    for proto, port in PORTS[service]:
        assert host.socket(f"{proto}://0.0.0.0:{port}").is_listening, journal(
            host, f"teia-{service}.service"
        )
    assert host.service("teia-firewall.service").is_running
    rules = host.check_output("nft list table inet teia")
    assert "policy drop" in rules
    for _proto, port in PORTS[service]:
        assert f"dport {port} accept" in rules
    assert str(METRICS[service]) not in rules  # metrics stay on loopback and closed
    assert "tcp dport" not in rules or service == "relay"  # not even SSH in the lab


def test_metrics_served_on_loopback(host: Any) -> None:
    service = service_of(host)
    port = METRICS[service]
    body = host.check_output(
        "python3 -c 'import urllib.request,sys;"
        f'sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode())\''
    )
    assert f'teia_build_info{{service="{service}"' in body


def test_secrets_and_identities_private(host: Any) -> None:
    service = service_of(host)
    config = host.file(f"/etc/teia/{service}.toml")
    assert (config.user, config.group, config.mode) == ("root", "teia", 0o640)
    if service == "relay":
        secret = host.file("/etc/teia/relay-auth-secret")
        assert (secret.user, secret.group, secret.mode) == ("root", "teia", 0o640)
        assert "auth-secret-file" in config.content_string
        assert "lab-relay" not in config.content_string  # the secret itself is not in the config
    else:
        key = host.file(f"/var/lib/teia/{service}/{service}-identity.key")
        assert (key.user, key.mode) == ("teia", 0o600)


def test_each_node_names_every_other_node_of_its_group(host: Any) -> None:
    service = service_of(host)
    if service == "relay":
        return
    config = tomllib.loads(host.file(f"/etc/teia/{service}.toml").content_string)
    me = host.backend.get_hostname()
    others = (
        {peer_id_of(n, service) for n in lab_hosts(service) if n != me}
        if me.startswith("teia-lab-")
        else set()
    )
    # Discovery nodes bootstrap from each other; store nodes name each other as static peers.
    key = "bootstrap" if service == "discovery" else "peer"
    named = {Multiaddr(a).peer_id for a in config[key]}
    assert named == others


def test_check_config_refuses_a_broken_file(host: Any) -> None:
    service = service_of(host)
    broken = host.run(
        f"printf 'no-such-setting = 1\\n' > /tmp/broken.toml && /opt/teia/venv/bin/teia {service} "
        "--config /tmp/broken.toml --check-config"
    )
    assert broken.rc == 1
    assert "unknown setting" in broken.stderr


# --- from the controller ----------------------------------------------------------------------


def _run(main: Any) -> Any:
    return anyio.run(main, backend="trio")


def test_peers_join_through_different_discovery_nodes_and_find_each_other() -> None:
    bootstrap = [
        Multiaddr(f"/ip4/{lab_address(n)}/udp/4001/quic-v1/p2p/{peer_id_of(n, 'discovery')}")
        for n in lab_hosts("discovery")
    ]
    # Alice knows only the first node, Bob only the last: they meet because the playbook
    # wired the discovery nodes to each other.
    alice_boot, bob_boot = bootstrap[0], bootstrap[-1]
    alice_addr = Multiaddr("/ip4/192.0.2.7/udp/4242/quic-v1")  # documentation range: never dialled

    async def main() -> list[Multiaddr]:
        with anyio.fail_after(TIMEOUT):
            async with (
                Host(Identity.generate(), listen=["/ip4/0.0.0.0/udp/0/quic-v1"]) as alice_host,
                DhtNode(alice_host, mode=Mode.CLIENT) as alice,
            ):
                assert await alice.bootstrap([alice_boot]) == 1
                assert await alice.publish_record(addrs=[alice_addr]) >= 1
                async with (
                    Host(Identity.generate(), listen=["/ip4/0.0.0.0/udp/0/quic-v1"]) as bob_host,
                    DhtNode(bob_host, mode=Mode.CLIENT) as bob,
                ):
                    assert await bob.bootstrap([bob_boot]) == 1
                    record = await bob.get_record(alice_host.peer_id)
                    assert record is not None
                    return list(record.record.addrs)

    assert len(bootstrap) >= 2
    assert _run(main) == [alice_addr]


def _store_nodes() -> list[Multiaddr]:
    return [
        Multiaddr(f"/ip4/{lab_address(n)}/udp/4003/quic-v1/p2p/{peer_id_of(n, 'store')}")
        for n in lab_hosts("store")
    ]


def test_envelopes_survive_a_rolling_restart_of_the_store_group() -> None:
    nodes = _store_nodes()
    assert len(nodes) >= 2
    alice = Identity.generate()
    inbox = inbox_for(alice.public_key)
    now_ms = int(time.time() * 1000)
    envelopes = [Envelope(inbox, os.urandom(16), b"sealed %d" % i, now_ms, 0) for i in range(50)]
    expected = sorted(e.message_id for e in envelopes)

    async def on_every_node(deposit: bool) -> list[list[bytes]]:
        with anyio.fail_after(TIMEOUT):
            async with Host(Identity.generate(), listen=["/ip4/0.0.0.0/udp/0/quic-v1"]) as host:
                client = StoreClient(host)
                held = []
                for node in nodes:
                    await host.connect(node)
                    assert node.peer_id is not None
                    if deposit:
                        statuses = await client.deposit(node.peer_id, envelopes)
                        assert statuses == [Status.OK] * len(envelopes)
                    got = await client.fetch_all(node.peer_id, alice)
                    held.append(sorted(e.message_id for e in got))
                await client.aclose()
                return held

    assert _run(lambda: on_every_node(True)) == [expected] * len(nodes)
    restart = subprocess.run(
        ["ansible-playbook", "-i", str(INVENTORY), "--vault-password-file",
         str(INVENTORY / "vault-password"), "-e", "teia_restart_group=store",
         str(REPO / "ansible" / "playbooks" / "rolling-restart.yml")],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert restart.returncode == 0, restart.stdout[-4000:] + restart.stderr[-2000:]
    assert "serial" not in restart.stderr
    assert _run(lambda: on_every_node(False)) == [expected] * len(nodes)


def test_a_peer_allocates_on_the_deployed_relay() -> None:
    (name,) = lab_hosts("relay")
    relay_ip = lab_address(name)
    secret = _vault_secret()

    async def main() -> AllocationCreated | AllocationFailed:
        username = f"{int(time.time()) + 600}:lab-test"
        client = TurnClient((relay_ip, 3478), username, rest_password(secret, username))
        async with await anyio.create_udp_socket(local_host="0.0.0.0") as sock:
            client.allocate(time.monotonic())
            with anyio.fail_after(TIMEOUT):
                while True:
                    for datagram in client.datagrams_to_send():
                        await sock.sendto(datagram, relay_ip, 3478)
                    event = client.next_event()
                    if isinstance(event, AllocationCreated | AllocationFailed):
                        return event
                    timer = client.get_timer()
                    wait = 1.0 if timer is None else max(0.0, timer - time.monotonic())
                    with anyio.move_on_after(wait):
                        data, _ = await sock.receive()
                        client.receive_datagram(data, time.monotonic())
                        continue
                    client.handle_timer(time.monotonic())

    event = _run(main)
    assert isinstance(event, AllocationCreated), event
    assert event.relayed[0] == relay_ip
    assert 49152 <= event.relayed[1] <= 49251  # the lab's relayed range, opened in the firewall


def _vault_secret() -> bytes:
    from ansible.constants import DEFAULT_VAULT_ID_MATCH
    from ansible.parsing.vault import VaultLib, VaultSecret

    password = (INVENTORY / "vault-password").read_bytes().strip()
    text = (INVENTORY / "group_vars" / "relay" / "vault.yml").read_text()
    vaulted = text.split("!vault |", 1)[1]
    ciphertext = "\n".join(line.strip() for line in vaulted.strip().splitlines())
    vault = VaultLib([(DEFAULT_VAULT_ID_MATCH, VaultSecret(password))])
    return bytes(vault.decrypt(ciphertext))
