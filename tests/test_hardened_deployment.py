"""The hardened deployment across hosts: network namespaces for the SuperLink host, two devices, an intruder.

One module-scoped network (``ip netns`` + veth pairs on a bridge in a switch namespace, private
addresses 10.231.0.0/24 that exist only inside these namespaces):

====================  ==============  ========================================================
namespace             address         runs
====================  ==============  ========================================================
``…-link``            10.231.0.1      ``fedavg-relu deploy superlink`` (SuperLink on 127.0.0.1,
                                      nginx on 10.231.0.1:9093); the operator's ``flwr``
``…-dev1/…-dev2``     .11 / .12       a SuperNode + ClientApp worker each; ``flwr`` with the CA
``…-intr``            .66             ``flwr`` with the CA and a key of its own
====================  ==============  ========================================================

Needs root, ``ip`` and nginx. Outside CI a missing one skips the test; in CI (``CI=true``,
set by ``.ci/run``, which also installs nginx-light and iproute2) it fails. The finalizer
stops every process by PID, then kills whatever is left in the namespaces (``ip netns pids``)
and deletes them, also when the test fails.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.deploy import CONNECTION, Deployment, _json_tail, _tool, venv_bin
from fedavg_relu.runtime.flower_run import descendants, pid_alive
from fedavg_relu.runtime.proxy import nginx_binary, superlink_routes

APP_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(APP_DIR / "scripts"))
from make_certs import make_certificates  # noqa: E402

LINK_IP, DEVICE_IPS, INTRUDER_IP = "10.231.0.1", ("10.231.0.11", "10.231.0.12"), "10.231.0.66"
PUBLIC_PORT, CONTROL_PORT = 9093, 9091
RUN = {"num-server-rounds": 2, "num-partitions": 2, "dataset": "synthetic", "width": 64, "local-steps": 3}


def missing_prerequisites() -> list[str]:
    """What this machine lacks for the test (root, ``ip``, nginx)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (ip netns needs it)")
    if shutil.which("ip") is None:
        missing.append("ip (apt-get install -y iproute2)")
    try:
        nginx_binary()
    except FileNotFoundError:
        missing.append("nginx (apt-get install -y nginx-light)")
    return missing


class Network:
    """Namespaces ``{prefix}-{host}`` on one bridge; each host's ``eth0`` has its address, ``lo`` is up."""

    def __init__(self, prefix: str, hosts: dict[str, str]) -> None:
        self.prefix, self.hosts = prefix, hosts
        self.switch = f"{prefix}-sw"
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    def up(self) -> None:
        for name in (self.switch, *map(self.ns, self.hosts)):
            self._ip("netns", "add", name)
            self.created.append(name)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            ns, port = self.ns(host), f"p-{host}"
            self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
            self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """SIGKILL every process still inside a namespace (by PID), then delete the namespaces."""
        for name in reversed(self.created):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.created = []


def _flwr_home(folder: Path, cafile: Path) -> Path:
    """A Flower home whose ``lab`` connection dials the proxy with only the CA certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "{LINK_IP}:{PUBLIC_PORT}"\n'
        f'root-certificates = "{cafile}"\n'
    )
    return folder


def _in_ns(ns: str, home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=home)


_PROBE = r"""
import http.client, json, socket, ssl, sys
host, public, internal, cafile, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
out = {"statuses": []}
try:
    socket.create_connection((host, internal), timeout=3).close()
    out["internal-port"] = "open"
except OSError as err:
    out["internal-port"] = type(err).__name__
context = ssl.create_default_context(cafile=cafile)
for method, path in requests:
    conn = http.client.HTTPSConnection(host, public, context=context, timeout=10)
    headers = {"User-Agent": "fedavg-relu-probe", **({"Content-Type": "application/protobuf"} if method == "POST" else {})}
    conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
    out["statuses"].append([method, path, conn.getresponse().status])
    conn.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The network, certificates for 10.231.0.1, and the one-command SuperLink + proxy in the link namespace."""
    missing = missing_prerequisites()
    if missing:
        message = f"the hardened deployment test needs {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; in CI it must run (.ci/run installs nginx-light and iproute2)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("hardened")
    os.chmod(root, 0o755)  # nginx's workers run as nobody
    certs = root / "certs"
    make_certificates(certs, hosts=[LINK_IP], num_nodes=3)
    net = Network(f"fr24-{os.getpid()}", {"link": LINK_IP, "dev1": DEVICE_IPS[0], "dev2": DEVICE_IPS[1],
                                          "intr": INTRUDER_IP})
    superlink: subprocess.Popen | None = None
    operator: Deployment | None = None
    try:
        net.up()
        home = root / "superlink"
        log = open(root / "deploy.out", "wb")  # noqa: SIM115 - the child keeps it
        superlink = subprocess.Popen(  # the documented one command, on the SuperLink host
            ["ip", "netns", "exec", net.ns("link"), str(venv_bin() / "fedavg-relu"), "deploy", "superlink",
             "--certs", str(certs), "--public-host", LINK_IP, "--public-port", str(PUBLIC_PORT),
             "--port", str(CONTROL_PORT), "--home", str(home)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
        )
        log.close()
        deadline = time.monotonic() + 120
        while "ready (SIGINT or SIGTERM stops both)" not in (root / "deploy.out").read_text(errors="replace"):
            output = (root / "deploy.out").read_text(errors="replace")
            assert superlink.poll() is None and time.monotonic() < deadline, f"deploy superlink: {output[-3000:]}"
            time.sleep(0.3)
        operator = Deployment(certs, home=root / "operator", address=f"127.0.0.1:{CONTROL_PORT}", netns=net.ns("link"))
        yield {"net": net, "certs": certs, "root": root, "home": home, "superlink": superlink, "operator": operator}
    finally:
        if operator is not None:
            operator.stop()  # the SuperNodes it started, by process group
        if superlink is not None and superlink.poll() is None:
            children = descendants(superlink.pid)
            superlink.send_signal(signal.SIGTERM)  # `deploy superlink` stops nginx and the SuperLink itself
            try:
                superlink.wait(timeout=40)
            except subprocess.TimeoutExpired:
                superlink.kill()
                superlink.wait(timeout=10)
            for pid in children:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        net.down()


def _access_log(lab) -> list[tuple[str, str, str, int, str]]:
    """(client address, method, path, status, user agent) of each request nginx saw."""
    text = (lab["home"] / "proxy" / "access.log").read_text(errors="replace")
    line = re.compile(r'^(\S+) \[[^\]]*\] "(\S+) (\S+)[^"]*" (\d+) \S+ \S+ "([^"]*)"$', re.M)
    return [(m[1], m[2], m[3], int(m[4]), m[5]) for m in line.finditer(text)]


@pytest.mark.e2e
def test_only_the_operator_reaches_the_control_api(lab, tmp_path):
    """Across hosts, through the documented deployment:

    - the operator registers the devices' keys and lists nodes from the SuperLink host's loopback;
    - a 2-round run, started by the operator, completes through the proxy on both devices;
    - meanwhile, from device 1's address (holding the CA and its own registered key) and from the
      intruder's (the CA and a key of its own), the real `flwr supernode register`, `flwr supernode ls`,
      `flwr ls`, `flwr stop RUN_ID` and `flwr run` all fail with nginx's 403, and none had an effect:
      the run, still going after the stop attempts, completed; no third node and no second run exist;
    - the intruder's own SuperNode through the proxy is refused by node authentication (2004);
    - raw requests from the intruder and from device 1 to every other route of Flower's SuperLink
      (Control, Runtime, health, docs) and to unknown or disguised paths get 403; a Fleet route
      without a node signature is forwarded and refused by the SuperLink (401); the SuperLink's own
      port does not accept connections on the public address, and on the SuperLink host only nginx
      listens beyond loopback;
    - device 2's key, unregistered by the operator, ends its SuperNode, which then cannot rejoin.
    """
    net, certs, operator = lab["net"], lab["certs"], lab["operator"]
    root = lab["root"]
    cafile = certs / "ca.crt"
    public = f"{LINK_IP}:{PUBLIC_PORT}"

    # --- the operator, on the SuperLink host's loopback -------------------------------------
    ids = [operator.register(certs / f"supernode-{i}.pub", name=f"device-{i}") for i in (1, 2)]
    devices = [operator.start_supernode(certs / f"supernode-{i}", {"partition-id": i - 1}, name=f"device-{i}",
                                        superlink_address=public, netns=net.ns(f"dev{i}")) for i in (1, 2)]

    # --- while the devices start: the raw probe from the intruder, the listening sockets ----------
    others = sorted((m, p) for m, p in superlink_routes() if not p.startswith("/v1/fleet/"))
    disguised = [("GET", "/"), ("POST", "/v1/unknown"), ("POST", "/v1/fleet/get-run/"), ("GET", "/v1/fleet/get-run"),
                 ("POST", "/v1/fleet/../control/list-nodes"), ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
                 ("POST", "/v1//control/list-nodes"), ("POST", "/V1/control/list-nodes")]
    raw = {}
    for host in ("intr", "dev1"):
        probe = _in_ns(net.ns(host), root, sys.executable, "-c", _PROBE, LINK_IP, str(PUBLIC_PORT), str(CONTROL_PORT),
                       str(cafile), json.dumps(others + disguised + [("POST", "/v1/fleet/get-run")]))
        assert probe.returncode == 0, probe.stderr[-3000:]
        raw[host] = json.loads(probe.stdout)
    listening = _in_ns(net.ns("link"), root, "ss", "-ltnH").stdout
    operator.wait_online(2, timeout=120)

    # --- a run by the operator; attacks while it is going -----------------------------------
    homes = {"device": _flwr_home(tmp_path / "device-1", cafile), "intruder": _flwr_home(tmp_path / "intruder", cafile)}
    where = {"device": net.ns("dev1"), "intruder": net.ns("intr")}
    started, run_out = threading.Event(), {}

    def on_line(line: str) -> None:
        if m := re.search(r"Successfully started run (\d+)", line):
            run_out["id"] = m.group(1)
            started.set()

    def operator_run() -> None:
        try:
            run_out["result"] = operator.run(APP_DIR, {**RUN, "output-dir": str(tmp_path / "runs"), "run-name": "lab"},
                                             timeout=400, on_line=on_line)
        finally:
            started.set()

    runner = threading.Thread(target=operator_run, daemon=True)
    runner.start()
    assert started.wait(timeout=180) and "id" in run_out, run_out
    run_id = run_out["id"]
    attacks = {
        "register": ["supernode", "register", str(certs / "supernode-3.pub"), "lab"],
        "supernode ls": ["supernode", "ls", "lab"],
        "ls": ["ls", "lab"],
        "run": ["run", str(APP_DIR), "lab", "--run-config", "num-server-rounds=1"],
    }
    rogue = operator.start_supernode(certs / "supernode-3", {"partition-id": 0}, name="intruder-node",
                                     superlink_address=public, netns=net.ns("intr"), isolation="subprocess",
                                     max_retries=2, max_wait_time=20)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        stops = {(who, "stop"): pool.submit(_in_ns, where[who], homes[who], _tool("flwr"), "stop", run_id, "lab")
                 for who in ("device", "intruder")}
        outcomes = {key: future.result() for key, future in stops.items()}
        during = operator.status(int(run_id))  # the stop attempts came while the run was going
        futures = {(who, what): pool.submit(_in_ns, where[who], homes[who], _tool("flwr"), *args)
                   for what, args in attacks.items() for who in ("device", "intruder")}
        outcomes.update({key: future.result() for key, future in futures.items()})
    runner.join(timeout=400)
    result = run_out["result"]
    rogue_code = rogue.wait(timeout=120)

    for (who, what), proc in outcomes.items():
        assert proc.returncode != 0, (who, what, proc.stdout[-2000:])
        assert "403 Forbidden" in proc.stdout + proc.stderr, (who, what, proc.stdout[-2000:], proc.stderr[-2000:])
    assert not during.startswith("finished"), during
    assert result.status == "finished:completed", result.output[-3000:]  # not stopped by the attempts
    rows = read_metrics(tmp_path / "runs" / "lab")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients-trained"] == 2 and r["clients-measured"] == 2 for r in rows[1:]), (rows, result.output[-3000:])
    nodes = operator.nodes()
    assert sorted(int(n["node-id"]) for n in nodes) == sorted(ids)  # no third node registered
    runs = _json_tail(operator.flwr("ls", CONNECTION, "--format", "json").stdout).get("runs", [])
    assert [str(r.get("run-id")) for r in runs] == [run_id]  # no run submitted by anyone else
    assert rogue_code != 0 and "[code: 2004] Failed to activate SuperNode" in rogue.log(), rogue.log()[-2000:]

    # --- what nginx saw: the SuperNodes called Fleet paths only, all forwarded; control calls were refused --
    log = _access_log(lab)
    assert len(log) == len((lab["home"] / "proxy" / "access.log").read_text().splitlines())  # every line parsed
    supernodes = [e for e in log if e[0] in DEVICE_IPS and e[4] != "fedavg-relu-probe" and not e[2].startswith("/v1/control/")]
    assert supernodes and all(path.startswith("/v1/fleet/") and status == 200 for _, _, path, status, _ in supernodes), \
        [e for e in supernodes if e[3] != 200 or not e[2].startswith("/v1/fleet/")]
    for who, address in (("device", DEVICE_IPS[0]), ("intruder", INTRUDER_IP)):
        control = {(m, p): s for a, m, p, s, _ in log if a == address and p.startswith("/v1/control/")}
        for path in ("register-node", "list-nodes", "list-runs", "stop-run", "start-run"):
            assert control.get(("POST", f"/v1/control/{path}")) == 403, (who, path, control)

    # --- the raw probes and the listening sockets -------------------------------------------
    for host, found in raw.items():
        statuses = {(m, p): s for m, p, s in found["statuses"]}
        refused = {key: s for key, s in statuses.items() if key != ("POST", "/v1/fleet/get-run")}
        assert len(refused) == len(others) + len(disguised) and set(refused.values()) == {403}, \
            (host, {k: s for k, s in refused.items() if s != 403})
        assert statuses[("POST", "/v1/fleet/get-run")] == 401, host  # forwarded; the SuperLink wants a signature
        assert found["internal-port"] == "ConnectionRefusedError", host
    public_sockets = {line.split()[3] for line in listening.splitlines()
                      if not line.split()[3].startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))}
    assert public_sockets == {public}, listening

    # --- revoking device 2: unregistered, its SuperNode ends, and it cannot rejoin ---------------
    revoked = operator.flwr("supernode", "unregister", str(ids[1]), CONNECTION)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    deadline = time.monotonic() + 60
    while devices[1].alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not devices[1].alive(), devices[1].log()[-2000:]
    devices[1].stop()  # its worker
    rejoin = operator.start_supernode(certs / "supernode-2", {"partition-id": 1}, name="device-2-again",
                                      superlink_address=public, netns=net.ns("dev2"), isolation="subprocess",
                                      max_retries=2, max_wait_time=20)
    assert rejoin.wait(timeout=120) != 0
    assert "[code: 2004] Failed to activate SuperNode" in rejoin.log(), rejoin.log()[-2000:]
    status = {int(n["node-id"]): n["status"] for n in operator.nodes()}
    assert status == {ids[0]: "online", ids[1]: "unregistered"}, status
