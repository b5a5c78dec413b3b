"""The production image: the Dockerfile as it is, built and run as an admin would.

A Docker engine (Debian's docker.io) is started here when none runs. No image registry is
reachable from this machine, so the Dockerfile's base image is stood in for: a Debian
bookworm root made with debootstrap (minbase) and imported with `docker import`, with
Debian's python3 in a virtual environment at /usr/local, where the official
python:3.11-slim keeps its Python, and this machine's pip settings (CA bundle, index), so
that pip reaches the package index inside the build. It is built once and kept under the
FROM tag; an image of that tag that is not our stand-in (the real one) is used as it is.

Every container runs with host networking, its traffic on loopback only: the recording
MX and DNS server of the other tests, on 127.0.0.1. The containers run hardened as the
docs advise (read-only root, no capabilities, no new privileges).

Also here: deploy/compose.yaml, checked by docker-compose's own parser (the three nodes,
Redis and the shared spool volume), and deploy/cluster/relay.yaml by check-config. The
cluster itself is tested with real processes in test_cluster.py and test_takeover.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.dnsserver import DnsServer
from tests.mxserver import MxFarm, MxServer
from tests.relayproc import RelayProcess, base_config, free_port, make_message

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STANDIN_LABEL = "org.relay.test.standin"
# Bump when the stand-in's recipe changes: an older stand-in is then rebuilt.
STANDIN_VERSION = "1"
BUILD_LABEL = "org.relay.test.build=1"
MAX_CONTEXT = 5_000_000  # bytes sent to the daemon as the build context
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HEALTHY_WITHIN = 60.0

pytestmark = pytest.mark.timeout(900)  # a cold machine builds the base image first


# the tools and the engine


def _require_root_or_skip(why: str) -> None:
    if os.geteuid() != 0:
        _no_docker(f"{why}, and only root can install or start it here")


def _no_docker(reason: str) -> None:
    """Skip where dockerd cannot run at all; in CI (which must run this) fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the image test must run in CI: {reason}")
    pytest.skip(reason)


def _apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            _no_docker(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


def _docker_client() -> str:
    # Debian's client, of the same release as its daemon, before any other on PATH.
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    assert found, "docker.io is installed but no docker client is on PATH"
    return found


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [_docker_client(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine that answers: the one running, or one started here (and stopped)."""
    if not (shutil.which("dockerd") and shutil.which("debootstrap")):
        _require_root_or_skip("docker.io or debootstrap is not installed")
        _apt_install("docker.io", "debootstrap")
    if _engine_answers():
        yield
        return
    _require_root_or_skip("no Docker engine runs")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log:
        # No bridge and no iptables rules: every container here uses the host's network.
        daemon = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not _engine_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            daemon.wait(timeout=30)
            _no_docker(f"dockerd cannot start here:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)  # dockerd offers no readiness signal but its answering socket
    try:
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)


# the stand-in base image


def _base_tag() -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().upper().startswith("FROM "):
            return line.split()[1]
    raise AssertionError("the Dockerfile has no FROM line")


def _image_labels(tag: str) -> dict[str, str] | None:
    """The image's labels, or None when there is no such image."""
    result = docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag, check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout) or {}


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the one reachable from here)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if re.match(r"^\w[\w-]*:", line)
            )
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[-2] == "bookworm":
                return parts[-3] if not parts[1].startswith("[") else parts[2]
    return DEFAULT_MIRROR


def _pip_settings() -> dict[str, str]:
    """pip's effective settings here (`pip config list`: files and PIP_* variables)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line)
        if match:
            settings[match.group(1)] = match.group(2)
    return settings


def _pip_conf_for_build(root: Path) -> str:
    """/etc/pip.conf for the stand-in: what makes this machine's pip reach its index.
    Local paths (file:// indexes, find-links) do not exist inside the build: left out."""
    settings = _pip_settings()
    lines = ["[global]"]
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cert, root / "etc/ssl/certs/pip-build-ca.pem")
        lines.append("cert = /etc/ssl/certs/pip-build-ca.pem")
    for key in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(key, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            lines.append(f"{key} = {' '.join(urls)}")
    if settings.get("trusted-host"):
        lines.append(f"trusted-host = {settings['trusted-host']}")
    return "\n".join(lines) + "\n"


def _build_standin(tag: str, workdir: Path) -> None:
    root = workdir / "root"
    result = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv",
            "bookworm",
            str(root),
            _debian_mirror(),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}"
    # python:3.11-slim keeps its Python in /usr/local; a venv there puts python and pip
    # where the Dockerfile expects them, without touching Debian's own (PEP 668).
    subprocess.run(["chroot", str(root), "python3", "-m", "venv", "/usr/local"], check=True)
    (root / "etc/pip.conf").write_text(_pip_conf_for_build(root))
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [
            _docker_client(),
            "import",
            "--change",
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["python3"]',
            "--change",
            f"LABEL {STANDIN_LABEL}={STANDIN_VERSION}",
            "-",
            tag,
        ],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tar.stdout is not None
    tar.stdout.close()
    assert tar.wait(timeout=60) == 0
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    tag = _base_tag()
    labels = _image_labels(tag)
    if labels is not None and labels.get(STANDIN_LABEL, STANDIN_VERSION) == STANDIN_VERSION:
        return tag  # our current stand-in, or the real image
    started = time.monotonic()
    _build_standin(tag, tmp_path_factory.mktemp("standin"))
    print(f"stand-in {tag} built in {time.monotonic() - started:.0f}s")
    return tag


# the image


class Image:
    def __init__(self, tag: str, context_bytes: int, build_log: str) -> None:
        self.tag = tag
        self.context_bytes = context_bytes
        self.build_log = build_log


_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


@pytest.fixture(scope="module")
def image(base_image: str) -> Image:
    # Images this test built before and replaced since: untagged layers, not kept.
    docker("image", "prune", "--force", "--filter", f"label={BUILD_LABEL}", check=False)
    tag = "relay:test"
    proxies = [
        f"{name}={os.environ[name]}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy")
        if name in os.environ
    ]
    started = time.monotonic()
    build = docker(
        "build",
        "--network",
        "host",  # pip in the build reaches the index through the host's network
        "--force-rm",  # a failed step leaves no container behind
        "--label",
        BUILD_LABEL,
        *(arg for proxy in proxies for arg in ("--build-arg", proxy)),
        "--tag",
        tag,
        str(ROOT),
        timeout=900,
    )
    print(f"image built in {time.monotonic() - started:.0f}s")
    match = re.search(
        r"Sending build context to Docker daemon\s+([\d.]+)\s*([kMG]?B)", build.stdout
    )
    assert match, f"no build context size in the build output:\n{build.stdout[:2000]}"
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    return Image(tag, size, build.stdout)


# a relay container and its world


class Container:
    """One `docker run` of the image; removed by the `world` fixture."""

    def __init__(self, name: str) -> None:
        self.name = name

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"


class World:
    """The image's surroundings on loopback: DNS, a recording MX, one config, one spool
    volume; containers started from it share the volume, like restarts of one service."""

    def __init__(
        self, image: Image, workdir: Path, dns: DnsServer, farm: MxFarm, password_hash: str
    ) -> None:
        self.image = image
        self.dns = dns
        self.farm = farm
        self.run_id = uuid.uuid4().hex[:10]
        self.volume = f"relay-test-spool-{self.run_id}"
        self.containers: list[Container] = []
        dns.add("example.org", "A", "127.0.0.9")  # the sender's domain is routable
        self.mx: MxServer = farm.server("127.0.0.1")
        for domain in ("ok.test", "later.test"):
            dns.mx(domain, (10, f"mx.{domain}"))
            dns.add(f"mx.{domain}", "A", "127.0.0.1")
        config = base_config(workdir, dns.port, farm.port, password_hash)
        config["spool"]["path"] = "/var/spool/relay"
        config["tls"] = {
            "self_signed": True,
            "cert": "/etc/relay/tls/fullchain.pem",
            "key": "/etc/relay/tls/privkey.pem",
        }
        config["admin"]["token"] = uuid.uuid4().hex
        # The client side of tests.relayproc (SMTP and admin API); the daemon runs in docker.
        self.relay = RelayProcess(workdir, config)
        self.relay.config_path.chmod(0o644)  # read by the image's user

    def start(self) -> Container:
        container = Container(f"relay-test-{self.run_id}-{len(self.containers)}")
        self.containers.append(container)
        docker(
            "run",
            "--detach",
            "--name",
            container.name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            f"{self.volume}:/var/spool/relay",
            "--volume",
            f"{self.relay.config_path}:/etc/relay/relay.yaml:ro",
            "--env",
            f"RELAY_HEALTHCHECK_URL=http://127.0.0.1:{self.relay.admin_port}/readyz",
            # The image's check, run every second rather than every 30 s.
            "--health-interval",
            "1s",
            self.image.tag,
        )
        self._wait_greeting(container)
        return container

    def _wait_greeting(self, container: Container, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not container.running():
                raise AssertionError(f"{container.name} exited:\n{container.logs()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.relay.port), timeout=1) as sock,
            ):
                sock.settimeout(5)
                if sock.recv(64).startswith(b"220"):
                    return
            time.sleep(0.1)  # the listener is not up yet: nothing to wait on but the port
        raise AssertionError(f"no SMTP greeting within {timeout}s:\n{container.logs()}")

    def send(self, subject: str, to: str) -> str:
        """STARTTLS, AUTH, one message; the queue id from the 250."""
        return self.relay.send("app@example.org", [to], make_message(subject, to=to))

    def delivered(self, subject: str, timeout: float = 30) -> list[str]:
        """Recipients of the messages with this subject the MX has recorded (bounded wait)."""
        needle = f"Subject: {subject}\r\n".encode()

        def matching() -> list[str]:
            return [r for m in self.mx.messages if needle in m.data for r in m.rcpt_tos]

        self.mx.wait_for(lambda: bool(matching()), timeout)
        return matching()

    def close(self) -> None:
        for container in self.containers:
            docker("rm", "--force", "--volumes", container.name, check=False)
        docker("volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def world(image: Image, tmp_path: Path, password_hash: str) -> Iterator[World]:
    dns = DnsServer().start()
    farm = MxFarm(free_port())
    world = World(image, tmp_path, dns, farm, password_hash)
    try:
        yield world
    finally:
        world.close()
        farm.stop()
        dns.stop()


def _uids(pid: int) -> set[int]:
    """Real and effective uids of a process and all its descendants, as the kernel says."""
    uids: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        status = Path(f"/proc/{current}/status").read_text()
        real, effective = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M).groups()  # type: ignore[union-attr]
        uids |= {int(real), int(effective)}
        for task in Path(f"/proc/{current}/task").iterdir():
            pending.extend(int(p) for p in (task / "children").read_text().split())
    return uids


def _wait_health(container: Container, timeout: float = HEALTHY_WITHIN) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = container.inspect("{{.State.Health.Status}}")
        if status in ("healthy", "unhealthy"):
            return status
        time.sleep(0.5)  # docker reports health only by polling
    return status


# the tests


def test_build_context_is_small(image: Image) -> None:
    """.dockerignore keeps .venv, var/, .git and the rest out of the build context."""
    assert image.context_bytes < MAX_CONTEXT, (
        f"build context {image.context_bytes / 1e6:.1f} MB; check .dockerignore"
    )


def test_image_runs_non_root_serves_starttls_and_is_healthy(world: World) -> None:
    configured = docker("image", "inspect", "--format", "{{.Config.User}}", world.image.tag)
    assert configured.stdout.strip() not in ("", "root", "0", "0:0")
    container = world.start()
    pid = int(container.inspect("{{.State.Pid}}"))
    uids = _uids(pid)
    assert 0 not in uids, f"a process of the container runs as root: uids {uids}"

    world.send("through the image", "alice@ok.test")
    assert world.delivered("through the image") == ["alice@ok.test"], container.logs()
    received = next(m for m in world.mx.messages if b"through the image" in m.data)
    assert b"Received: from client.test" in received.data
    assert _wait_health(container) == "healthy", container.inspect("{{json .State.Health}}")


def test_docker_stop_exits_zero_in_time_and_keeps_the_queue(world: World) -> None:
    world.mx.rcpt_hook = lambda address: "451 4.3.0 not now"  # the message stays queued
    container = world.start()
    queue_id = world.send("kept across stop", "bob@later.test")
    assert world.mx.wait_for(lambda: world.mx.connections >= 1, 30), container.logs()

    started = time.monotonic()
    docker("stop", container.name, timeout=60)  # docker's default: SIGKILL after 10 s
    elapsed = time.monotonic() - started
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    assert elapsed < 10, f"docker stop took {elapsed:.1f}s: SIGKILL, not a drain"
    assert re.search(r"stopped; 1 messages? remains? in the spool", container.logs())

    world.mx.rcpt_hook = lambda address: None
    successor = world.start()
    assert world.delivered("kept across stop") == ["bob@later.test"], successor.logs()
    assert queue_id in successor.logs()


def test_acknowledged_mail_survives_docker_kill(world: World) -> None:
    world.mx.rcpt_hook = lambda address: "451 4.3.0 not now"
    container = world.start()
    queue_id = world.send("kept across kill", "carol@later.test")
    docker("kill", container.name)  # SIGKILL, right after the 250
    assert container.inspect("{{.State.ExitCode}}") == "137"

    world.mx.rcpt_hook = lambda address: None
    successor = world.start()
    assert world.delivered("kept across kill") == ["carol@later.test"], successor.logs()
    assert queue_id in successor.logs()


# deploy/compose.yaml


def _compose() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(
        [_docker_client(), "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode == 0:
        return [_docker_client(), "compose"]
    _require_root_or_skip("neither docker-compose nor docker compose is installed")
    _apt_install("docker-compose")
    return ["docker-compose"]


def test_compose_file_describes_the_cluster() -> None:
    result = subprocess.run(
        [*_compose(), "--file", str(ROOT / "deploy/compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("relay-")}
    assert len(nodes) == 3 and "redis" in services
    addresses = set()
    for name, node in nodes.items():
        assert node["network_mode"] == "host", name
        assert node["read_only"] is True and node["cap_drop"] == ["ALL"], name
        assert any(v.endswith(":/var/spool/relay:rw") for v in node["volumes"]), name
        assert node["environment"]["RELAY_NODE"] == name
        addresses.add(node["environment"]["RELAY_ADDRESS"])
    assert len(addresses) == 3, "each node needs its own address on the host's network"
    assert services["redis"]["network_mode"] == "host"


def test_cluster_config_is_valid(tmp_path: Path) -> None:
    """The nodes' config passes check-config with a node's environment: its spool is its
    own directory of the shared volume."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(ROOT / "deploy/cluster/relay.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RELAY_NODE": "relay-a", "RELAY_ADDRESS": "127.0.1.1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "listener submission: 127.0.1.1:2587" in result.stdout
    assert "spool: /var/spool/relay/relay-a" in result.stdout
    assert (
        "cluster: node relay-a, redis redis://127.0.0.1:6379, lease 30s, "
        "shared_spool=/var/spool/relay takeover_after=120s" in result.stdout
    )
