"""The images built and run by a real Docker engine, as the README's Docker section runs them:
``docker compose build``, ``up --wait``, the publisher, reads through the proxy on the host
port, a restart, three replicas, a SIGKILL of every replica while the publisher publishes, and
``down -v``.

The module runs when a Docker engine answers (``docker info``) and is skipped, saying so,
when none does; ``.ci/run`` starts one with ``../shared/docker/engine.sh``. Its tests are the
steps of one walk-through, in order, on a compose project of the module's own: a unique project
name, image tag and host port, so it never meets a developer's stack. Figures (build time,
image size) are printed as ``[docker]`` lines, never asserted.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER = shutil.which("docker")
UID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The orders of the first publish, and those published while the replicas are killed; the
# rate keeps the second publisher running for seconds after the kill is decided.
FIRST_COUNT = 200
KILLED_COUNT, KILLED_RATE, KILL_AFTER = 1200, 200, 200
REPLICAS = 3


def engine_missing() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if DOCKER is None:
        return "no Docker engine: no docker command on PATH"
    try:
        done = subprocess.run(
            [DOCKER, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "no Docker engine: docker info did not answer within 30 s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers docker info: {last}"
    return None


_MISSING = engine_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def show(capsys: pytest.CaptureFixture[str], step: str, **figures: object) -> None:
    """One ``[docker]`` line of figures, past pytest's capture."""
    line = " ".join(f"{key}={value}" for key, value in figures.items())
    with capsys.disabled():
        print(f"\n[docker] {step}: {line}", flush=True)


# ---------------------------------------------------------------------------------------------
# The compose project


@dataclasses.dataclass
class Stack:
    """One compose project of this module's own, and what has been published into it."""

    project: str
    port: int
    published: list[str] = dataclasses.field(default_factory=list)

    @property
    def image(self) -> str:
        return f"orders-stream:{self.project}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "ORDERS_WEB_PORT": str(self.port), "ORDERS_IMAGE_TAG": self.project}

    def command(self, *arguments: str) -> list[str]:
        assert DOCKER is not None
        return [
            DOCKER,
            "compose",
            "--project-name",
            self.project,
            "-f",
            str(COMPOSE_FILE),
            *arguments,
        ]

    def compose(
        self, *arguments: str, stdin: str | None = None, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*arguments),
            cwd=ROOT,
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert done.returncode == 0, (
                f"docker compose {' '.join(arguments)}: exit {done.returncode}\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done

    def containers(self, service: str) -> list[dict[str, Any]]:
        """``docker compose ps`` of one service, as dictionaries (Name, State, Health...)."""
        out = self.compose("ps", "--all", "--format", "json", service).stdout.strip()
        if not out:
            return []
        if out.startswith("["):  # older compose releases print one array
            parsed: list[dict[str, Any]] = json.loads(out)
            return parsed
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_healthy(self, service: str, count: int, timeout: float = 240) -> None:
        """Until ``count`` containers of the service run and their healthcheck passes."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.containers(service)
            healthy = [
                c for c in found if c.get("State") == "running" and c.get("Health") == "healthy"
            ]
            if len(healthy) == count == len(found):
                return
            assert time.monotonic() < deadline, f"{service} not {count}x healthy: {found}"
            time.sleep(1)

    def psql(self, query: str) -> list[str]:
        """The rows of a query on the compose file's PostgreSQL, one text line each."""
        done = self.compose(
            "exec",
            "-T",
            "postgres",
            "sh",
            "-c",
            'psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -c "$0"',
            query,
        )
        return done.stdout.split()

    def publish(self, count: int) -> list[str]:
        done = self.compose("run", "--rm", "-T", "publisher", "--count", str(count))
        return uids_of(done.stdout.splitlines(), count)


def uids_of(lines: list[str], count: int) -> list[str]:
    uids = [line.strip() for line in lines if line.strip()]
    assert len(uids) == count, f"the publisher printed {len(uids)} uids, not {count}"
    assert all(UID.fullmatch(uid) for uid in uids), uids[:5]
    assert len(set(uids)) == count, "the publisher printed a uid twice"
    return uids


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The project; whatever the tests leave, it is taken down with its volumes and image."""
    made = Stack(f"orders-test-{uuid.uuid4().hex[:10]}", free_port())
    try:
        yield made
    finally:
        made.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
        assert DOCKER is not None
        subprocess.run(
            [DOCKER, "image", "rm", "--force", made.image], capture_output=True, timeout=120
        )


# ---------------------------------------------------------------------------------------------
# HTTP from the host (through the proxy) and from inside a replica


class Http:
    """A kept-alive connection to the proxy's host port; reconnects when nginx closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.connection.request("GET", path)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                # nginx ends a kept-alive connection after keepalive_requests: open a new one.
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def missing(self, uids: list[str]) -> dict[str, int]:
        """The uids not served as their own order (uid -> HTTP status)."""
        missing: dict[str, int] = {}
        for uid in uids:
            status, body = self.get(f"/orders/{uid}")
            if status != 200 or json.loads(body).get("order_uid") != uid:
                missing[uid] = status
        return missing

    def close(self) -> None:
        self.connection.close()


def eventually(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.5)


# Runs in a replica (the image's python, standard library only): its own /readyz, then every
# uid read from stdin against its own view, never through the proxy.
REPLICA_CHECK = """
import json, os, sys, urllib.error, urllib.request
base = "http://127.0.0.1:" + os.environ.get("ORDERS_WEB_PORT", "8080")
def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
status, body = get("/readyz")
missing = [uid for uid in sys.stdin.read().split() if get("/orders/" + uid)[0] != 200]
print(json.dumps({"status": status, "readyz": json.loads(body), "missing": missing}))
"""


def replica_views(stack: Stack, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Each app replica's own answer: its /readyz and the uids its view does not serve."""
    answers: dict[str, dict[str, Any]] = {}
    for container in stack.containers("app"):
        index = container["Name"].rsplit("-", 1)[1]
        done = stack.compose(
            "exec", "-T", "--index", index, "app", "python", "-c", REPLICA_CHECK,
            stdin="\n".join(uids),
        )  # fmt: skip
        answers[container["Name"]] = json.loads(done.stdout)
    return answers


def assert_every_replica_serves(stack: Stack, uids: list[str], replicas: int) -> None:
    answers: dict[str, dict[str, Any]] = {}

    def all_served() -> bool:
        nonlocal answers
        answers = replica_views(stack, uids)
        return len(answers) == replicas and all(
            a["status"] == 200 and a["readyz"]["orders"] == len(uids) and not a["missing"]
            for a in answers.values()
        )

    try:
        eventually(all_served, f"{replicas} replicas each serving all {len(uids)} orders", 120)
    except AssertionError as failure:
        brief = {name: {**a["readyz"], "missing": len(a["missing"])} for name, a in answers.items()}
        raise AssertionError(f"{failure}; replicas: {brief}") from None


# ---------------------------------------------------------------------------------------------
# The walk-through, step by step


def test_compose_builds_the_image(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    stack.compose("build", "app", timeout=1800)
    seconds = time.monotonic() - started
    assert DOCKER is not None
    inspect = subprocess.run(
        [DOCKER, "image", "inspect", "--format", "{{.Size}}", stack.image],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    show(
        capsys,
        "build",
        image=stack.image,
        seconds=f"{seconds:.0f}",
        size_mb=f"{int(inspect.stdout) / 1e6:.0f}",
    )


def test_the_image_holds_no_build_tools_nor_embedded_servers(stack: Stack) -> None:
    """The runtime image runs as a non-root user, and holds no compiler, no packaging tools in
    its venv, and neither embedded server: compose gives the service both URLs."""
    probe = (
        "import importlib.util, os, shutil\n"
        "print(os.getuid())\n"
        "for name in ('pip', 'setuptools', 'wheel', 'pgserver'):\n"
        "    print(name, importlib.util.find_spec(name) is not None)\n"
        "for name in ('gcc', 'cc', 'make', 'nats-server'):\n"
        "    print(name, shutil.which(name) is not None)\n"
    )
    done = stack.compose(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "app", "-c", probe
    )
    uid, *found = done.stdout.splitlines()
    assert uid.strip() not in ("", "0"), done.stdout
    present = [line.split()[0] for line in found if line.endswith("True")]
    assert not present, f"the image holds {present}"


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("ORDERS_DATABASE_URL", "set ORDERS_DATABASE_URL or install orders-stream[embedded]"),
        ("ORDERS_NATS_URL", "set ORDERS_NATS_URL or install orders-stream[embedded]"),
    ],
)
def test_without_a_url_the_image_says_which_to_set(stack: Stack, unset: str, message: str) -> None:
    """The image has no embedded servers: an unset URL is one clear line and exit code 2, not
    a traceback."""
    done = stack.compose("run", "--rm", "--no-deps", "-T", "-e", f"{unset}=", "app", check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"configuration error: {message}\n" in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_up_wait_brings_every_service_up_healthy(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    stack.compose("up", "--detach", "--wait", timeout=600)
    seconds = time.monotonic() - started
    for service in ("postgres", "nats", "app", "proxy"):
        stack.wait_healthy(service, 1, timeout=10)
    show(capsys, "up --wait", seconds=f"{seconds:.0f}")


def test_published_orders_are_served_through_the_proxy(stack: Stack) -> None:
    stack.published = stack.publish(FIRST_COUNT)
    client = Http(stack.port)
    try:
        eventually(lambda: not client.missing(stack.published), "every order through the proxy")
        status, body = client.get("/readyz")
        assert status == 200, body
        ready = json.loads(body)
        assert (ready["status"], ready["orders"]) == ("ready", FIRST_COUNT), ready
        status, body = client.get("/metrics")
        assert status == 200, body
        assert f"orders_stored_total {FIRST_COUNT}.0" in body.decode().splitlines()
        status, page = client.get("/")
        assert status == 200 and b"<input" in page
    finally:
        client.close()


def test_restart_restores_the_view_from_the_log(stack: Stack) -> None:
    stack.compose("restart", "app", timeout=120)
    stack.wait_healthy("app", 1)
    logs = stack.compose("logs", "--no-color", "app").stdout
    assert f"view restored: {FIRST_COUNT} orders from orders_events" in logs, logs[-3000:]
    client = Http(stack.port)
    try:
        assert not client.missing(stack.published)
    finally:
        client.close()


def test_three_replicas_each_serve_every_order(stack: Stack) -> None:
    stack.compose("up", "--detach", "--wait", "--scale", f"app={REPLICAS}", timeout=600)
    stack.wait_healthy("app", REPLICAS, timeout=10)
    assert_every_replica_serves(stack, stack.published, REPLICAS)


def test_sigkill_of_every_replica_mid_publish_loses_nothing(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Promise 1 under the harshest stop Docker has: every replica SIGKILLed while the
    publisher still publishes, then started again. Every order JetStream acked is in
    orders_events exactly once and served by every replica."""
    with tempfile.TemporaryFile("w+") as errors:
        publisher = subprocess.Popen(
            stack.command(
                "run", "--rm", "-T", "publisher",
                "--count", str(KILLED_COUNT), "--rate", str(KILLED_RATE),
            ),
            cwd=ROOT,
            env=stack.env(),
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )  # fmt: skip
        assert publisher.stdout is not None
        # A publisher that hangs is ended, so that reading its output to the end cannot hang.
        watchdog = threading.Timer(300, publisher.kill)
        watchdog.start()
        try:
            printed = [publisher.stdout.readline() for _ in range(KILL_AFTER)]
            stack.compose("kill", "-s", "SIGKILL", "app", timeout=60)
            # The scenario itself: had the publisher finished, nothing was killed mid-publish.
            still_publishing = publisher.poll() is None
            # From the same buffered reader: what readline() read ahead is in it, not in the pipe.
            printed += publisher.stdout.readlines()
            publisher.wait()
        finally:
            watchdog.cancel()
            if publisher.poll() is None:
                publisher.kill()
                publisher.wait()
            publisher.stdout.close()
            errors.seek(0)
            stderr = errors.read()
    assert still_publishing, "the publisher finished before the replicas were killed"
    assert publisher.returncode == 0, stderr
    killed = uids_of(printed, KILLED_COUNT)
    # What the kill left, before the start: Docker restarts no replica a kill stopped.
    states = sorted(c["State"] for c in stack.containers("app"))
    (stored_before_start,) = stack.psql("SELECT count(*) FROM orders_events")

    started = time.monotonic()
    stack.compose("start", "app", timeout=120)
    stack.wait_healthy("app", REPLICAS)
    every = [*stack.published, *killed]
    stored: list[str] = []

    def all_stored() -> bool:
        nonlocal stored
        stored = stack.psql("SELECT order_uid FROM orders_events")
        return len(stored) >= len(every)

    # Messages handed to a killed replica and never acked come back after the ack wait (30 s).
    eventually(all_stored, f"{len(every)} orders in orders_events", timeout=240)
    recovered_s = time.monotonic() - started
    assert sorted(stored) == sorted(every), "orders_events differs from what was published"
    client = Http(stack.port)
    try:
        assert not client.missing(every)
    finally:
        client.close()
    assert_every_replica_serves(stack, every, REPLICAS)
    show(
        capsys,
        "sigkill",
        replicas=REPLICAS,
        published=len(every),
        states_before_start=",".join(states),
        stored_before_start=stored_before_start,
        stored=len(stored),
        all_stored_after_start_s=f"{recovered_s:.0f}",
    )


def test_down_removes_every_container_volume_and_network(stack: Stack) -> None:
    stack.compose("down", "--volumes", "--timeout", "30", timeout=300)
    assert DOCKER is not None
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "--all"], ["volume", "ls"], ["network", "ls"]):
        left = subprocess.run(
            [DOCKER, *kind, "--quiet", "--filter", label],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert not left.stdout.strip(), f"docker {' '.join(kind)} after down -v: {left.stdout}"
