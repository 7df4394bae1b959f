"""The proxy's route lists against the installed Flower's SuperLink routes (a contract; seconds, no processes).

``deploy/nginx.conf.template`` forwards exact Fleet paths and refuses the rest. These tests read
the routes of the SuperLink app that ``flower-superlink`` serves (``flwr.superlink.main.create_app``)
and the paths Flower's SuperNode calls (``flwr.supernode.fleet_http_client``), and fail when a
Flower upgrade adds, renames or removes a route, so that the proxy is reviewed before it forwards
too much or too little.
"""

from __future__ import annotations

import inspect
import re
import subprocess

import pytest

from fedavg_relu.runtime.proxy import (
    NginxProxy, forwarded_routes, nginx_binary, read_template, refused_prefixes, render_nginx_conf, superlink_routes,
)

CONF = read_template()
DIRECTIVES = "\n".join(line.split("#", 1)[0] for line in CONF.splitlines())  # the template without comments
FLEET = "/v1/fleet/"


@pytest.fixture(scope="module")
def routes() -> set[tuple[str, str]]:
    return superlink_routes()


def supernode_paths() -> set[str]:
    """Every path Flower's SuperNode sends to the SuperLink (its Fleet HTTP client's ``path=`` literals)."""
    from flwr.supernode import fleet_http_client  # noqa: PLC0415

    return set(re.findall(r'path="(/[^"]+)"', inspect.getsource(fleet_http_client)))


def test_the_proxy_forwards_exactly_flowers_fleet_routes(routes):
    """The forwarded paths are exactly the SuperLink's /v1/fleet/* routes (12 in flwr 1.42), each
    to the same path upstream; a Fleet route added or renamed by Flower fails here."""
    fleet = {path for _, path in routes if path.startswith(FLEET)}
    forwarded = forwarded_routes(CONF)
    assert len(fleet) >= 10, sorted(fleet)  # the route table was read, not an empty app
    assert set(forwarded) == fleet, {"not forwarded": sorted(fleet - set(forwarded)),
                                     "forwarded, not in Flower": sorted(set(forwarded) - fleet)}
    assert all(upstream == path for path, upstream in forwarded.items()), forwarded


def test_fleet_routes_are_post_only(routes):
    """Every Fleet route takes POST and nothing else, which the template's `limit_except POST` enforces."""
    methods = {method for method, path in routes if path.startswith(FLEET)}
    assert methods == {"POST"}
    assert DIRECTIVES.count("limit_except POST { deny all; }") == len(forwarded_routes(CONF))


def test_the_supernode_calls_only_forwarded_paths():
    """What Flower's SuperNode calls is what the proxy forwards: nothing it needs is refused, and
    nothing is forwarded that no SuperNode calls."""
    called = supernode_paths()
    assert called, "no path literals found in flwr.supernode.fleet_http_client"
    assert called == set(forwarded_routes(CONF))


def test_every_other_route_falls_under_a_refused_prefix(routes):
    """Each SuperLink route that is not forwarded starts with one of the template's refused prefixes
    (Control, Runtime, health, the API docs), and each refused prefix still names a route: a new
    router prefix in Flower, or a stale entry here, fails the test."""
    refused = refused_prefixes(CONF)
    assert {"/v1/control/", "/v1/runtime/"} <= set(refused)
    others = {path for _, path in routes if not path.startswith(FLEET)}
    unclassified = sorted(p for p in others if not any(p.startswith(prefix) for prefix in refused))
    assert not unclassified, f"routes neither forwarded nor refused by name in the template: {unclassified}"
    stale = [prefix for prefix in refused if not any(p.startswith(prefix) for p in others)]
    assert not stale, f"refused prefixes that match no SuperLink route any more: {stale}"


def test_the_only_other_location_refuses():
    """Besides the exact Fleet locations, the template has one catch-all that answers 403 and proxies nothing."""
    locations = re.findall(r"^\s*location\s+(.*?)\s*\{", DIRECTIVES, flags=re.M)
    assert len(locations) == len(forwarded_routes(CONF)) + 1
    catch_all = re.search(r"location / \{(.*?)\}", DIRECTIVES, flags=re.S)
    assert catch_all and catch_all.group(1).split() == ["return", "403;"]
    assert DIRECTIVES.count("proxy_pass") == len(forwarded_routes(CONF))


def test_render_fills_every_placeholder_and_rejects_unknown_ones(tmp_path):
    """Rendering names the listen address (IPv6 in brackets), the upstream port and the certificate
    files; a placeholder the renderer does not know is an error naming it."""
    text = render_nginx_conf(tmp_path / "certs", tmp_path / "p", "10.0.0.5", 9093, 9091)
    assert "{{" not in text
    assert "listen 10.0.0.5:9093 ssl;" in text and "server 127.0.0.1:9091;" in text
    assert f"ssl_certificate {tmp_path / 'certs' / 'server.pem'};" in text
    assert "listen [::1]:9093 ssl;" in render_nginx_conf(tmp_path, tmp_path, "::1", 9093, 9091)
    with pytest.raises(ValueError, match=r"placeholders \['port_typo'\]"):
        render_nginx_conf(tmp_path, tmp_path, "10.0.0.5", 9093, 9091, template=CONF + "# {{port_typo}}\n")


def test_nginx_accepts_the_rendered_configuration(tmp_path):
    """`nginx -t` accepts the rendered template (with real certificates) and refuses a broken one.
    Skipped where nginx is absent, except in CI (CI=true), where .ci/run installs it."""
    _certs_or_skip(tmp_path)
    proxy = NginxProxy(tmp_path / "certs", tmp_path / "proxy", "127.0.0.1", 9093, 9091)
    proxy.write_conf()
    proxy.check()
    bad = proxy.conf_path.read_text().replace("return 403;", "return 403")
    proxy.conf_path.write_text(bad)
    with pytest.raises(RuntimeError, match="nginx -t refused"):
        proxy.check()
    assert subprocess.run(proxy.command("-t"), capture_output=True).returncode != 0


def test_the_documented_one_command_is_what_the_cli_parses():
    """docs/deployment.md's one-command block parses with `fedavg-relu`'s own parser into the deploy
    subcommand, with the addresses the page then uses (devices dial 10.0.0.5:9093; the operator
    127.0.0.1:9091)."""
    import shlex  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from fedavg_relu.cli import _cmd_deploy_superlink, build_parser  # noqa: PLC0415

    page = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", page, flags=re.S) if "fedavg-relu deploy superlink" in b]
    assert len(blocks) == 1, blocks
    command = blocks[0].replace("\\\n", " ").split("fedavg-relu ", 1)[1].splitlines()[0]
    args = build_parser().parse_args(shlex.split(command))
    assert args.func is _cmd_deploy_superlink
    assert (args.public_host, args.public_port, args.port) == ("10.0.0.5", 9093, 9091)
    assert "--superlink 10.0.0.5:9093" in page and 'address = "127.0.0.1:9091"' in page
    assert "ssh -N -L 9091:127.0.0.1:9091" in page


def test_deploy_proxy_renders_the_ratio_and_the_run_it_came_from(tmp_path):
    """render:deploy-proxy turns a results file into rows whose last cell is proxy / direct
    (2.0 ms / 1.0 ms -> 2.00×; 9.0 s / 6.0 s -> 1.50×) and names the date and commit of the run."""
    import importlib.util  # noqa: PLC0415
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("render_docs_for_proxy", root / "scripts" / "render_docs.py")
    render_docs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = render_docs
    spec.loader.exec_module(render_docs)
    stat = {"median": 1.0, "p90": 1.5, "n": 400}
    run = {"round-1": 20.0, "round": 6.0, "node-round": 1.0}
    data = {"proxy": {
        "date": "2026-12-07", "commit": "abc1234", "cpus": 2, "loadavg": [1.0, 1.0, 1.0], "nginx": "1.22.1",
        "config": "paper, m=64", "summary": {
            "requests": {"direct-keep-alive": stat, "proxy-keep-alive": {**stat, "median": 2.0},
                         "direct-new-connection": stat, "proxy-new-connection": stat},
            "runs": {"direct": run, "proxy": {**run, "round": 9.0}}}}}
    (tmp_path / "proxy.json").write_text(json.dumps(data))
    text = render_docs.render_deploy_proxy(tmp_path, {"file": "proxy.json"})
    assert "| 1.00 / 1.50 | 2.00 / 1.50 | 2.00× |" in text
    assert "| later rounds, s (median) | 6.00 | 9.00 | 1.50× |" in text
    assert "2026-12-07 at commit abc1234" in text
    assert "Not measured yet" in render_docs.render_deploy_proxy(tmp_path, {"file": "missing.json"})


def _certs_or_skip(tmp_path, hosts=("127.0.0.1", "localhost")):
    """Certificates in ``tmp_path/certs``; skips where nginx is absent (fails in CI, where .ci/run installs it)."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    try:
        nginx_binary()
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(err))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_certs import make_certificates  # noqa: PLC0415

    make_certificates(tmp_path / "certs", hosts=list(hosts), num_nodes=0)
    return tmp_path / "certs"


def test_a_proxy_on_a_taken_address_fails_with_nginxs_reason(tmp_path):
    """Two proxies on one address: the second start raises with nginx's "Address already in use"
    instead of mistaking the first one's 403 for its own; the first keeps serving and stops by PID."""
    from fedavg_relu.runtime.flower_run import free_port, pid_alive  # noqa: PLC0415

    certs = _certs_or_skip(tmp_path)
    port = free_port()
    first = NginxProxy(certs, tmp_path / "a", "127.0.0.1", port, 1)
    second = NginxProxy(certs, tmp_path / "b", "127.0.0.1", port, 1)
    first.start()
    try:
        pid = first.process.pid
        with pytest.raises(RuntimeError, match="Address already in use"):
            second.start(timeout=20)
        assert '"GET /health HTTP/1.1" 403' in first.access_log()
    finally:
        first.stop()
        second.stop()
    assert not pid_alive(pid)


def test_hardened_superlink_refuses_a_certificate_without_the_public_host(tmp_path):
    """server.pem made for 127.0.0.1/localhost cannot serve devices dialling 10.0.0.5: the error names
    what the certificate holds and the make_certs command that fixes it; nothing is started."""
    from fedavg_relu.runtime.proxy import HardenedSuperLink, certificate_names  # noqa: PLC0415

    certs = _certs_or_skip(tmp_path)
    assert certificate_names(certs / "server.pem") == {"127.0.0.1", "localhost"}
    with pytest.raises(ValueError, match=r"public_host='10.0.0.5'.*names \['127.0.0.1', 'localhost'\].*--host 10.0.0.5 --force"):
        HardenedSuperLink(certs, tmp_path / "home", "10.0.0.5")
    assert not (tmp_path / "home").exists()


class _FakeHardened:
    """What :func:`serve` uses of a HardenedSuperLink, with `sleep` processes for the SuperLink and nginx."""

    def __init__(self, superlink_seconds: float) -> None:
        from pathlib import Path  # noqa: PLC0415
        from types import SimpleNamespace  # noqa: PLC0415

        self.seconds = superlink_seconds
        self.certs, self.home = Path("/certs"), Path("/home")
        self.control_address, self.public_address = "127.0.0.1:9091", "10.0.0.5:9093"
        self.deployment, self.proxy = SimpleNamespace(superlink=None), SimpleNamespace(process=None)
        self.stopped = False

    def start(self) -> None:
        self.deployment.superlink = subprocess.Popen(["sleep", str(self.seconds)])
        self.proxy.process = subprocess.Popen(["sleep", "60"])

    def stop(self) -> None:
        for proc in (self.deployment.superlink, self.proxy.process):
            proc.kill()
            proc.wait()
        self.stopped = True


def test_serve_stops_both_and_fails_when_the_superlink_dies():
    """The SuperLink exits on its own 0.5 s after start: serve() says so, stops nginx too and returns 1,
    after printing the devices' address, the SSH tunnel and the operator's config.toml section."""
    from fedavg_relu.runtime.proxy import serve  # noqa: PLC0415

    fake, lines = _FakeHardened(0.5), []
    assert serve(fake, say=lines.append, poll=0.1) == 1
    text = "\n".join(lines)
    assert fake.stopped and fake.proxy.process.returncode is not None
    assert "--superlink 10.0.0.5:9093" in text and "ssh -N -L 9091:127.0.0.1:9091" in text
    assert '[superlink.lab]\naddress = "127.0.0.1:9091"' in text
    assert text.splitlines()[-1].startswith("flower-superlink exited (code 0); stopping")


def test_serve_returns_0_after_sigterm():
    """SIGTERM while serving: serve() stops both, returns 0 (the one command's normal end) and puts
    the previous SIGTERM handler back."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from fedavg_relu.runtime.proxy import serve  # noqa: PLC0415

    fake, before = _FakeHardened(60), signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert serve(fake, say=lambda _: None, poll=0.1) == 0
    finally:
        timer.cancel()
    assert fake.stopped and signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
