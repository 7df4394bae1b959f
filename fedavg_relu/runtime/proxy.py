"""A hardened SuperLink: loopback only, with nginx on the public address forwarding the Fleet API alone.

Flower 1.42 serves every API of the SuperLink on one HTTP port: Fleet (``/v1/fleet/*``,
what SuperNodes call), Control (``/v1/control/*``, what ``flwr`` calls: register nodes,
list and stop runs, start runs whose ServerApp executes on the SuperLink host), the
Runtime API (``/v1/runtime/*``) and ``/health``. The open-source build has no account
authentication, and neither ``flwr`` nor ``flower-supernode`` can present a client
certificate. So the routes are separated by network reach:

- :class:`HardenedSuperLink` starts the SuperLink (:class:`~fedavg_relu.runtime.deploy.Deployment`:
  TLS, ``--enable-supernode-auth``) on ``127.0.0.1`` and :class:`NginxProxy` on the public
  address. nginx terminates TLS with the SuperLink's own certificate, forwards the exact
  Fleet paths listed in ``deploy/nginx.conf.template`` (re-encrypted, verified against the
  same CA) and answers 403 to everything else.
- The operator runs ``flwr`` on the SuperLink host, or through an SSH tunnel to its
  loopback (docs/deployment.md).

:func:`superlink_routes` reads the routes of the installed Flower's SuperLink app, and
:func:`forwarded_routes` / :func:`refused_prefixes` read the template, so that
``tests/test_proxy_routes.py`` fails when Flower's routes and the proxy's lists part ways.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from fedavg_relu.runtime.deploy import Deployment
from fedavg_relu.runtime.flower_run import stop_process_group

#: The proxy configuration, a file of this repository (rendered per deployment)
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf.template"
_LOCATION = re.compile(r"^\s*location\s*=\s*(\S+)\s*\{(.*)\}\s*$", re.M)
_PROXY_PASS = re.compile(r"proxy_pass\s+https://superlink(\S*);")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def read_template(path: str | os.PathLike = TEMPLATE) -> str:
    """The text of the proxy configuration template."""
    return Path(path).read_text(encoding="utf-8")


def forwarded_routes(conf: str) -> dict[str, str]:
    """``{path: upstream path}`` of every exact-match ``location`` of ``conf`` that proxies to the SuperLink."""
    out = {}
    for path, body in _LOCATION.findall(conf):
        if match := _PROXY_PASS.search(body):
            out[path] = match.group(1)
    return out


def refused_prefixes(conf: str) -> list[str]:
    """The path prefixes the template says it refuses (its ``# refused-prefixes:`` line)."""
    for line in conf.splitlines():
        if line.startswith("# refused-prefixes:"):
            return line.split(":", 1)[1].split()
    raise ValueError("no '# refused-prefixes:' line in the proxy template")


def superlink_routes() -> set[tuple[str, str]]:
    """``(method, path)`` of every route of the installed Flower's SuperLink HTTP app.

    Builds the app as ``flower-superlink`` does (:func:`fedavg_relu.flower.seam.superlink_http_app`,
    no configuration: in-memory state, nothing started) and walks its routers.
    """
    from fastapi.routing import iter_route_contexts  # noqa: PLC0415

    from fedavg_relu.flower.seam import superlink_http_app  # noqa: PLC0415

    routes = set()
    for context in iter_route_contexts(superlink_http_app().routes):
        for method in context.methods or ():
            routes.add((method, context.path))
    return routes


def render_nginx_conf(
    certs: str | os.PathLike, prefix: str | os.PathLike, listen_host: str, listen_port: int, superlink_port: int,
    template: str | None = None,
) -> str:
    """The template with every ``{{name}}`` filled in; an error naming any placeholder left over."""
    certs, prefix = Path(certs).resolve(), Path(prefix).resolve()
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    values = {
        "user": _worker_user_line(),
        "prefix": str(prefix),
        "listen": f"{host}:{listen_port}",
        "superlink_port": str(superlink_port),
        "certfile": str(certs / "server.pem"),
        "keyfile": str(certs / "server.key"),
        "cafile": str(certs / "ca.crt"),
    }
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template or read_template())
    if left := sorted(set(_PLACEHOLDER.findall(text))):
        raise ValueError(f"proxy template: placeholders {left} have no value; expected only {sorted(values)}")
    return text


def _worker_user_line() -> str:
    """As root, nginx's workers (which parse untrusted requests) run as ``nobody``; otherwise as the caller."""
    if os.geteuid() != 0:
        return "# not root: the workers run as the user who started nginx"
    for group in ("nogroup", "nobody"):
        try:
            grp.getgrnam(group)
            return f"user nobody {group};"
        except KeyError:
            continue
    return "user nobody;"


def nginx_binary() -> str:
    """The ``nginx`` executable (``/usr/sbin`` is often not on a user's PATH); an install hint if absent."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        raise FileNotFoundError("nginx not found: install it (Debian/Ubuntu: apt-get install -y nginx-light)")
    return found


class NginxProxy:
    """nginx from the template, in the foreground, in its own folder; started and stopped by PID.

    ``prefix`` holds ``nginx.conf``, the logs, the pid file and temporary folders.
    """

    def __init__(
        self, certs: str | os.PathLike, prefix: str | os.PathLike, listen_host: str, listen_port: int,
        superlink_port: int,
    ) -> None:
        self.certs = Path(certs).resolve()
        self.prefix = Path(prefix).resolve()
        self.listen_host, self.listen_port, self.superlink_port = listen_host, listen_port, superlink_port
        self.conf_path = self.prefix / "nginx.conf"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` the devices connect to."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def write_conf(self) -> Path:
        """Render the template into ``prefix/nginx.conf`` (and create the folders it names)."""
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (self.prefix / "nginx.pid").unlink(missing_ok=True)  # a stale one from an earlier start
        self.conf_path.write_text(
            render_nginx_conf(self.certs, self.prefix, self.listen_host, self.listen_port, self.superlink_port)
        )
        return self.conf_path

    def command(self, *extra: str) -> list[str]:
        """``nginx -p PREFIX -e ERROR_LOG -c CONF EXTRA...``."""
        return [nginx_binary(), "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                "-c", str(self.conf_path), *extra]

    def check(self) -> None:
        """``nginx -t`` on the rendered configuration; raises with nginx's words if it is refused."""
        proc = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"nginx -t refused {self.conf_path}:\n{proc.stderr}")

    def start(self, timeout: float = 30.0) -> None:
        """Write and check the configuration, start nginx, wait until it answers TLS on its address."""
        self.write_conf()
        self.check()
        with open(self.prefix / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with code {self.process.returncode}: {self.error_log()[-2000:]}")
            # nginx writes its pid file once it has bound the port: the 403 is then ours, not another server's
            if self._pid_file_is_ours() and _status(f"https://{self.address}/health", context) == 403:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"nginx did not answer on {self.address} within {timeout:.0f}s: {self.error_log()[-2000:]}")

    def _pid_file_is_ours(self) -> bool:
        try:
            return self.process is not None and int((self.prefix / "nginx.pid").read_text().strip()) == self.process.pid
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM nginx's process group (master and worker), SIGKILL what is left."""
        proc, self.process = self.process, None
        stop_process_group(proc, term_wait=5.0)

    def access_log(self) -> str:
        """One line per request: ``ADDRESS [TIME] "METHOD PATH HTTP/1.1" STATUS BYTES SECONDS "USER-AGENT"``."""
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        """nginx's error log so far."""
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _status(url: str, context: ssl.SSLContext) -> int | None:
    """The HTTP status of ``GET url`` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ssl.SSLError):
        return None


def certificate_names(certfile: str | os.PathLike) -> set[str]:
    """The subjectAltName entries (IP addresses and DNS names, as text) of a PEM certificate."""
    from cryptography import x509  # noqa: PLC0415

    cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


class HardenedSuperLink:
    """The SuperLink on ``127.0.0.1:port`` and nginx on ``public_host:public_port``; a context manager.

    Parameters
    ----------
    certs
        ``scripts/make_certs.py`` output. ``server.pem`` must name ``public_host`` (what the
        devices dial) and ``localhost`` (what nginx verifies upstream).
    home
        The SuperLink's ``FLWR_HOME``: its database ``state.db`` (registered nodes, runs)
        survives restarts; logs; ``proxy/`` with nginx's configuration and logs; the
        operator's ``config.toml``.
    """

    def __init__(
        self, certs: str | os.PathLike, home: str | os.PathLike, public_host: str, public_port: int = 9093,
        port: int = 9091,
    ) -> None:
        self.certs = Path(certs).resolve()
        names = certificate_names(self.certs / "server.pem")
        missing = [name for name in (public_host, "localhost") if name not in names]
        if missing:
            raise ValueError(
                f"public_host={public_host!r}: {self.certs / 'server.pem'} names {sorted(names)}, not {missing}; "
                f"recreate it: python scripts/make_certs.py {self.certs} --host {public_host} --force"
            )
        if public_host in ("127.0.0.1", "localhost", "::1") and public_port == port:
            raise ValueError(f"public_port={public_port}: the SuperLink already listens on 127.0.0.1:{port}")
        self.home = Path(home).resolve()
        self.deployment = Deployment(self.certs, home=self.home, keep_home=True, address=f"127.0.0.1:{port}")
        self.proxy = NginxProxy(self.certs, self.home / "proxy", public_host, public_port, port)

    @property
    def public_address(self) -> str:
        """What the SuperNodes dial (``--superlink``)."""
        return self.proxy.address

    @property
    def control_address(self) -> str:
        """What the operator's ``flwr`` dials, on this host's loopback."""
        return self.deployment.address

    def start(self) -> None:
        """Start the SuperLink, then nginx; on any failure both are stopped."""
        self.deployment.start()
        try:
            self.proxy.start()
        except BaseException:
            self.deployment.stop()
            raise

    def stop(self) -> None:
        """Stop nginx (no new device traffic), then the SuperLink (and any SuperNode it started)."""
        self.proxy.stop()
        self.deployment.stop()

    def __enter__(self) -> HardenedSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def operator_connection(name: str, control_address: str, cafile: str | os.PathLike) -> str:
    """The ``config.toml`` section with which ``flwr`` reaches the Control API on loopback."""
    return f'[superlink.{name}]\naddress = "{control_address}"\nroot-certificates = "{Path(cafile).resolve()}"\n'


def serve(hardened: HardenedSuperLink, say=None, poll: float = 1.0) -> int:
    """Start ``hardened``, tell the operator how to connect, and keep it up until SIGINT or SIGTERM.

    Returns 0 after a signal (both stopped), 1 when the SuperLink or nginx exits on its own
    (the other is stopped too, and the reason is printed).
    """
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    say = say or (lambda text: print(text, flush=True))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        hardened.start()
        host, port = hardened.control_address.rsplit(":", 1)
        say(f"SuperLink: {hardened.control_address} (loopback only; Control, Fleet, Runtime APIs)")
        say(f"proxy:     {hardened.public_address} (nginx; forwards the Fleet API only, refuses the rest with 403)")
        say(f"devices:   flower-supernode --superlink {hardened.public_address} --root-certificates ca.crt "
            "--auth-supernode-private-key supernode-K ...")
        say(f"operator:  on this host, or through `ssh -N -L {port}:{host}:{port} USER@THIS-HOST`, with this in "
            "~/.flwr/config.toml:")
        say(operator_connection("lab", hardened.control_address, hardened.certs / "ca.crt"))
        say("ready (SIGINT or SIGTERM stops both)")
        while not stop.wait(poll):
            for what, proc in (("flower-superlink", hardened.deployment.superlink), ("nginx", hardened.proxy.process)):
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    say(f"{what} exited (code {code}); stopping. Logs: {hardened.home}")
                    return 1
        return 0
    finally:
        hardened.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
