"""The container files. No Docker engine is needed: the Dockerfile and docker-compose.yml are
checked statically (hadolint, the compose specification, the paths, stages, ports and names they
refer to), and the image's own commands, read out of the Dockerfile, run outside Docker: the
builder's pip command builds the wheels from the files the builder copies, the runtime stage's
pip command fills a fresh virtualenv, and the worker starts from it exactly as the image's CMD
starts it, with the image's environment, away from the source tree."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from ruamel.yaml import YAML

from bridge.embedded_nats import server_binary
from streams.config import Settings
from tests.harness import free_port, worker_env
from tests.worker import Worker, eventually, view_size

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# The stages the image is built from, and the ones whose pip commands the tests run.
BUILDER, TEST_WHEELS, BASE, TEST, RUNTIME = "builder", "test-wheels", "base", "test", "runtime"


# ---------------------------------------------------------------------------------------------
# Reading the Dockerfile


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    text: str  # what follows the keyword, continuation lines joined

    def flags(self) -> tuple[list[tuple[str, str]], str]:
        """The leading ``--name=value`` flags (RUN --mount, COPY --chown) and the rest."""
        flags: list[tuple[str, str]] = []
        rest = self.text
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags.append((name, value))
            rest = rest.lstrip()
        return flags, rest

    def mounts(self) -> list[dict[str, str]]:
        """RUN --mount flags as dictionaries (type, from, source, target)."""
        return [
            dict(part.split("=", 1) for part in value.split(","))
            for name, value in self.flags()[0]
            if name == "mount"
        ]

    def command(self) -> str:
        return self.flags()[1]


@dataclasses.dataclass
class Stage:
    name: str
    parent: str  # an image or an earlier stage
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The stages by name. Comment lines, also between continuation lines, are dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for text in logical:
        keyword, _, rest = text.partition(" ")
        if keyword.upper() == "FROM":
            parts = rest.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"unnamed stage: FROM {rest}"
            current = Stage(parts[2], parts[0], [])
            stages[current.name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append(Instruction(keyword.upper(), rest.strip()))
    return stages


def exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) CMD, ENTRYPOINT or HEALTHCHECK CMD."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    _, cmd, command = stage.last("HEALTHCHECK").text.partition(" CMD ")
    assert cmd, "HEALTHCHECK without CMD"
    return exec_form(command.strip())


def stage_state(
    stages: dict[str, Stage], name: str, image_env: dict[str, str], upto: int | None = None
) -> tuple[dict[str, str], str | None]:
    """The environment and WORKDIR in effect before the stage's instruction number ``upto``
    (after all of them by default): its ancestors' ENV, then its own, with ``$VAR`` expanded
    from the values before each ENV instruction, as Docker does."""
    stage = stages[name]
    if stage.parent in stages:
        env, workdir = stage_state(stages, stage.parent, image_env)
    else:
        env, workdir = dict(image_env), None
    for instruction in stage.instructions[:upto]:
        if instruction.keyword == "WORKDIR":
            assert instruction.text.startswith("/"), "an absolute WORKDIR"
            workdir = instruction.text
        elif instruction.keyword == "ENV":
            before = dict(env)
            for pair in shlex.split(instruction.text):
                key, equals, value = pair.partition("=")
                assert equals, f"ENV {instruction.text}: use the KEY=value form"
                env[key] = expand(value, before)
    return env, workdir


def expand(value: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced by their values (unset: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], ""), value)


def pip_runs(stage: Stage) -> list[Instruction]:
    """The RUN instructions that install or build Python packages (not useradd and the like)."""
    return [run for run in stage.all("RUN") if re.search(r"\bpip\b", run.command())]


# ---------------------------------------------------------------------------------------------
# Running the image's commands here


def on_host(text: str, paths: dict[str, Path]) -> str:
    """``text`` with the image's paths (``/opt/venv``, ``/wheels``...) replaced by ours."""
    if not paths:
        return text
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    pattern = rf"(?<![\w./-])(?:{alternatives})(?![\w.-])"
    return re.sub(pattern, lambda m: str(paths[m[0]]), text)


def image_env() -> dict[str, str]:
    """What the python:3.11-slim image provides, taken from this machine: its environment (pip's
    settings, certificates, HOME for pip's cache) less anything that points into the project's
    venv or configures the service, with this interpreter's directory first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ORDERS_")
        and key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    }
    env["PATH"] = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return env


def run_stage(
    stages: dict[str, Stage],
    name: str,
    paths: dict[str, Path],
    mounted: dict[str, Path],
    cwd: Path,
) -> None:
    """Run the stage's pip RUN instructions with /bin/sh -c, as Docker does, each in the
    environment and WORKDIR (else ``cwd``) in effect at that point. ``mounted`` tells where a
    stage keeps its /wheels, for RUN --mount=type=bind,from=STAGE."""
    stage = stages[name]
    runs = pip_runs(stage)
    assert runs, f"stage {name} runs no pip command"
    for run in runs:
        env, workdir = stage_state(stages, name, image_env(), stage.instructions.index(run))
        run_paths = dict(paths)
        for mount in run.mounts():
            if mount.get("type") == "bind":
                assert mount["source"] == mount["target"] == "/wheels", mount
                run_paths[mount["target"]] = mounted[mount["from"]]
            else:
                # The cache mount is pip's cache: the tests use this machine's.
                assert mount.get("type") == "cache", mount
        command = on_host(run.command(), run_paths)
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=on_host(workdir, run_paths) if workdir else cwd,
            env={key: on_host(value, run_paths) for key, value in env.items()},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"{name}: {command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``relative`` (or a folder above it) out of the build
    context. fnmatch is close enough to Docker's matching for the patterns used here."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if bare != pattern and fnmatch.fnmatchcase(candidate.rsplit("/", 1)[-1], bare):
                return True
    return False


def copy_build_context(stage: Stage, destination: Path) -> None:
    """Lay out what the stage's COPY instructions put in its WORKDIR: files from the build
    context less .dockerignore, symlinks kept as symlinks (Docker copies them as they are)."""
    patterns = dockerignore_patterns()
    for instruction in stage.all("COPY"):
        flags, rest = instruction.flags()
        assert not any(name == "from" for name, _ in flags), "COPY --from in the builder"
        *sources, target = shlex.split(rest)
        into = destination / target
        for source in sources:
            relative = source.rstrip("/")
            assert not ignored(relative, patterns), f".dockerignore excludes {source}"
            origin = ROOT / relative
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    into,
                    symlinks=True,
                    dirs_exist_ok=True,
                    ignore=lambda folder, names: [
                        n
                        for n in names
                        if ignored(str((Path(folder) / n).relative_to(ROOT)), patterns)
                    ],
                )
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into / origin.name, follow_symlinks=False)


@dataclasses.dataclass(frozen=True)
class Build:
    """The image's stages carried out in a temporary directory."""

    stages: dict[str, Stage]
    root: Path
    wheels: Path  # the builder's /wheels
    venv: Path  # the base stage's /opt/venv

    def project_wheel(self) -> Path:
        (wheel,) = self.wheels.glob("orders_stream-*.whl")
        return wheel

    def runtime(self, data_dir: Path) -> tuple[dict[str, str], Path]:
        """The runtime stage's environment and WORKDIR, its data dir moved to ``data_dir``."""
        env, workdir = stage_state(self.stages, RUNTIME, image_env())
        assert workdir is not None, "the runtime stage has no WORKDIR"
        paths = {"/opt/venv": self.venv, "/var/lib/orders": data_dir}
        host_env = {key: on_host(value, paths) for key, value in env.items()}
        return host_env, Path(on_host(workdir, paths))


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """The builder stage (copy the context, build the wheels), then the base stage (a fresh venv
    with the project's wheel and its runtime dependencies), each by its own pip commands. Its
    few hundred MB are removed afterwards."""
    stages = parse_dockerfile()
    assert stages[BASE].parent == stages[BUILDER].parent == "python:3.11-slim"
    assert stages[RUNTIME].parent == BASE
    root = tmp_path_factory.mktemp("image")
    src, wheels, venv = root / "src", root / "wheels", root / "venv"
    first_copy = stages[BUILDER].instructions.index(stages[BUILDER].all("COPY")[0])
    assert stage_state(stages, BUILDER, {}, first_copy)[1] == "/src", "COPY goes to /src"
    copy_build_context(stages[BUILDER], src)
    try:
        run_stage(stages, BUILDER, {"/src": src, "/wheels": wheels}, {}, root)
        run_stage(stages, BASE, {"/opt/venv": venv}, {BUILDER: wheels}, root)
        yield Build(stages, root, wheels, venv)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading docker-compose.yml and the README


def compose() -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(COMPOSE)
    assert isinstance(loaded, dict)
    return loaded


def interpolate(value: str) -> str:
    """Compose's interpolation with every variable unset: ``${VAR:-default}`` gives default."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m[2] or "", value)
    return value.replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {str(key): interpolate(str(value)) for key, value in env.items()}


def docker_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Docker\n")
    end = text.index("\n## ", start + 1)
    assert text.index("\n## Layout\n") == end, "the Docker section comes just before Layout"
    return text[start:end]


def services_named(section: str) -> set[str]:
    """The services the section's ``docker compose`` commands name."""
    named: set[str] = set()
    for match in re.finditer(r"docker compose\s+([^`#|\n]+)", section):
        words = shlex.split(match[1])
        subcommand, arguments = words[0], [w for w in words[1:] if not w.startswith("-")]
        if subcommand in ("run", "exec") and arguments:
            named.add(arguments[0])
        elif subcommand in ("restart", "logs", "stop", "start", "up", "build", "ps"):
            # "--scale app=3" leaves "app=3" among the arguments: it names app.
            named.update(argument.split("=", 1)[0] for argument in arguments)
    return named


# ---------------------------------------------------------------------------------------------
# Static checks


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    done = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_everything_compose_builds_from_or_mounts_exists() -> None:
    stages = parse_dockerfile()
    spec = compose()
    services: dict[str, dict[str, Any]] = spec["services"]
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"app", "publisher", "test"} <= set(built)
    for name, build_spec in built.items():
        context = ROOT / build_spec["context"]
        assert context.is_dir(), f"{name}: no build context {context}"
        assert (context / build_spec.get("dockerfile", "Dockerfile")).is_file(), name
        assert build_spec["target"] in stages, f"{name}: no stage {build_spec['target']}"
    assert built["app"]["target"] == built["publisher"]["target"] == RUNTIME
    assert built["test"]["target"] == TEST
    declared = set(spec.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).partition(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    init_scripts = sorted((ROOT / "init-db").glob("*.sql"))
    assert init_scripts, "init-db/ has no SQL for docker-entrypoint-initdb.d"
    assert "./init-db:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]


def test_readme_docker_section_names_existing_services_and_documents_the_variables() -> None:
    section = docker_section()
    services = set(compose()["services"])
    named = services_named(section)
    assert {"app", "publisher", "test"} <= named
    assert named <= services, f"the README names services compose lacks: {named - services}"
    variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text(encoding="utf-8")))
    assert variables >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "ORDERS_WEB_PORT"}
    undocumented = {v for v in variables if f"`{v}`" not in section}
    assert not undocumented, f"the README's Docker section does not explain {undocumented}"


def test_compose_configures_the_service_and_the_tests_with_valid_settings() -> None:
    stages = parse_dockerfile()
    services: dict[str, dict[str, Any]] = compose()["services"]
    runtime = stage_state(stages, RUNTIME, {})[0]
    app = Settings.from_env({**runtime, **environment(services["app"])})
    assert (app.web_host, app.data_dir) == ("0.0.0.0", Path("/var/lib/orders"))
    assert stages[RUNTIME].last("EXPOSE").text == str(app.web_port)
    assert "ports" not in services["app"], "replicas of app cannot share a host port"
    assert [str(port) for port in services["app"]["expose"]] == [str(app.web_port)]
    proxy = services["proxy"]
    assert [interpolate(str(port)) for port in proxy["ports"]] == ["8080:8080"]
    assert proxy["depends_on"]["app"] == {"condition": "service_healthy"}
    source, target, _ = proxy["volumes"][0].split(":")
    conf = (COMPOSE.parent / source).read_text(encoding="utf-8")
    assert target == "/etc/nginx/nginx.conf"
    assert re.search(r"listen 8080;", conf)
    assert f"http://app:{app.web_port}" in conf, "the proxy forwards to the app replicas"
    assert app.database_url == postgres_url(services["postgres"])
    assert app.nats_url == "nats://nats:4222"
    tests = environment(services["test"])
    assert tests["ORDERS_TEST_DATABASE_URL"] == app.database_url
    assert tests["ORDERS_TEST_NATS_URL"] == app.nats_url
    publisher = services["publisher"]
    arguments = [*publisher["entrypoint"], *publisher["command"]]
    assert arguments[arguments.index("--url") + 1] == app.nats_url
    assert environment(publisher)["ORDERS_NATS_URL"] == app.nats_url
    assert services["publisher"]["profiles"] == ["tools"]
    assert services["test"]["profiles"] == ["test"]
    for dependent in ("app", "test"):
        for server in ("postgres", "nats"):
            assert services[dependent]["depends_on"][server] == {"condition": "service_healthy"}
            assert "healthcheck" in services[server]


def postgres_url(postgres: dict[str, Any]) -> str:
    """The URL of the compose file's postgres service, as seen from the other services."""
    env = environment(postgres)
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    return f"postgresql://{user}:{password}@postgres:5432/{db}"


def test_the_image_runs_the_worker_in_exec_form_as_a_non_root_user() -> None:
    runtime = parse_dockerfile()[RUNTIME]
    assert exec_form(runtime.last("CMD").text) == [
        "faust",
        "-A",
        "streams.app",
        "worker",
        "-l",
        "info",
    ]
    assert not runtime.all("ENTRYPOINT"), "the worker must be PID 1 to get SIGTERM itself"
    user = runtime.last("USER").text.split(":")[0]
    assert user not in ("root", "0"), user
    assert "urllib" in " ".join(healthcheck_command(runtime))


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for kept_out in (
        ".git/HEAD",
        ".venv/bin/python",
        ".data/postgres/PG_VERSION",
        "streams/__pycache__/app.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".pytest_cache/v/x",
        "orders_stream.egg-info/PKG-INFO",
        "build/lib/streams/app.py",
        "dist/orders_stream-0.1.0-py3-none-any.whl",
    ):
        assert ignored(kept_out, patterns), kept_out
    for kept_in in (
        "init-db/01-schema.sql",
        "streams/schema.sql",
        "views/static/index.html",
        "publisher/model.json",
        "tests/conftest.py",
        "setup.cfg",
        "README.md",
        "Dockerfile",
        "docker-compose.yml",
    ):
        assert not ignored(kept_in, patterns), kept_in


def test_the_nats_command_serves_jetstream_and_its_health_endpoint(tmp_path: Path) -> None:
    """The compose file's nats command and healthcheck URL, run with this machine's nats-server
    (ports moved to free ones)."""
    nats = compose()["services"]["nats"]
    command = [str(c) for c in nats["command"]]
    assert command[0] == "nats-server"
    monitor = command[command.index("-m") + 1]
    url = nats["healthcheck"]["test"][-1]
    assert url.startswith(f"http://127.0.0.1:{monitor}/healthz?"), url
    port, http_port = free_port(), free_port()
    arguments = [str(server_binary()), *command[1:], "-a", "127.0.0.1", "-p", str(port)]
    arguments[arguments.index("-m") + 1] = str(http_port)
    arguments[arguments.index("-sd") + 1] = str(tmp_path)
    server = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        local = url.replace(f":{monitor}/", f":{http_port}/")
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(local, timeout=2) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"no answer from {local}"
                time.sleep(0.1)
        assert (tmp_path / "jetstream").is_dir(), "JetStream does not store in the -sd folder"
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------------------------------------
# The image's commands, run outside Docker


def test_the_wheel_carries_the_schema_the_page_and_the_model(build: Build) -> None:
    with zipfile.ZipFile(build.project_wheel()) as wheel:
        contents = {name: wheel.read(name) for name in wheel.namelist()}
    copied = build.root / "src"  # what the builder stage copied from the build context
    assert contents["streams/schema.sql"] == (copied / "init-db" / "01-schema.sql").read_bytes()
    assert b"CREATE TABLE IF NOT EXISTS orders_events" in contents["streams/schema.sql"]
    data = [*(copied / "views" / "static").iterdir(), copied / "publisher" / "model.json"]
    assert len(data) >= 3
    for path in data:
        name = path.relative_to(copied).as_posix()
        assert contents.get(name) == path.read_bytes(), f"the wheel lacks {name}"
    assert not [name for name in contents if name.startswith("tests/")]


class ImageWorker(Worker):
    """The worker started as the image's CMD starts it, in the image's environment."""

    def __init__(self, data_dir: Path, command: list[str], env: dict[str, str], cwd: Path) -> None:
        super().__init__(data_dir)
        self.command = command
        self.env = {**env, "ORDERS_WEB_PORT": str(self.port), "ORDERS_DATA_DIR": str(data_dir)}
        self.cwd = cwd


async def run(
    arguments: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """A short command, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run, arguments, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def grace_seconds(service: dict[str, Any]) -> float:
    match = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert match, service["stop_grace_period"]
    return float(match[1])


async def test_the_worker_starts_from_the_installed_wheel_as_the_image_starts_it(
    build: Build, tmp_path: Path, database_url: str, nats_url: str
) -> None:
    """The compose walk-through outside Docker: init-db on the database, the worker from the
    image's CMD, the publisher from the compose file, the healthcheck, a restart."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env, workdir = build.runtime(data_dir)
    assert workdir == data_dir
    command = exec_form(build.stages[RUNTIME].last("CMD").text)
    # The image's PATH finds the venv's programs, not this project's.
    for program in (command[0], "python"):
        found = shutil.which(program, path=env["PATH"])
        assert found is not None and Path(found).parent == build.venv / "bin", found
    where = await run(
        ["python", "-c", "import bridge, publisher, streams, views; print(streams.__file__)"],
        cwd=workdir,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(build.venv), where.stdout

    # What postgres's docker-entrypoint-initdb.d does on a new volume.
    with psycopg2.connect(database_url) as connection, connection.cursor() as cur:
        for script in sorted((ROOT / "init-db").glob("*.sql")):
            cur.execute(script.read_text(encoding="utf-8"))
    connection.close()

    name = uuid.uuid4().hex[:10]
    streams = worker_env(database_url, nats_url, name)
    worker = ImageWorker(data_dir, command, {**env, **streams}, workdir)
    with worker:
        assert (await worker.wait_ready())["orders"] == 0
        status, page, content_type = await worker.get("/")
        assert (status, content_type) == (200, "text/html") and b"<input" in page

        publisher = services["publisher"]
        arguments = [*publisher["entrypoint"], *publisher["command"]]
        arguments[arguments.index("--url") + 1] = nats_url
        count = int(arguments[arguments.index("--count") + 1])
        published = await run(
            arguments,
            cwd=workdir,
            env={
                **env,
                **environment(publisher),
                **streams,
                "ORDERS_NATS_URL": nats_url,
                "ORDERS_NATS_PUBLISH_SUBJECT": f"t{name}.new",
            },
        )
        assert published.returncode == 0, published.stderr
        uids = published.stdout.split()
        assert len(uids) == count

        async def all_stored() -> bool:
            return await view_size(worker) == count

        await eventually(all_stored, f"{count} published orders in the view", timeout=60)
        for uid in uids:
            status, _, _ = await worker.get(f"/orders/{uid}")
            assert status == 200, uid

        healthcheck = healthcheck_command(build.stages[RUNTIME])
        health = {**worker.env}
        assert (await run(healthcheck, cwd=workdir, env=health)).returncode == 0
        nobody = {**health, "ORDERS_WEB_PORT": str(free_port())}
        assert (await run(healthcheck, cwd=workdir, env=nobody)).returncode != 0

        # docker compose restart app: SIGTERM to the CMD, within the grace period.
        assert worker.stop(grace_seconds(services["app"])) == 0, worker.log()
        worker.start()
        assert (await worker.wait_ready())["orders"] == count
    log = worker.log()
    assert "view restored: 0 orders from orders_events" in log
    assert f"view restored: {count} orders from orders_events" in log


@pytest.mark.parametrize("unset", ["ORDERS_DATABASE_URL", "ORDERS_NATS_URL"])
def test_without_the_embedded_extra_an_unset_url_is_one_clear_line(
    build: Build, tmp_path: Path, unset: str
) -> None:
    """The image's venv has no embedded servers (the "embedded" extra): the worker, started
    as the image starts it with one URL unset, says which to set in one line and exits 2,
    before it connects to anything (the URLs name no server)."""
    env, workdir = build.runtime(tmp_path)
    env.update(
        ORDERS_DATABASE_URL="postgresql://orders@127.0.0.1:1/orders",
        ORDERS_NATS_URL="nats://127.0.0.1:1",
    )
    env[unset] = ""
    # The image's PATH: its venv and the system's, not this project's venv (or /usr/sbin),
    # whose nats-server the embedded server would find.
    env["PATH"] = os.pathsep.join([str(build.venv / "bin"), "/usr/bin", "/bin"])
    command = exec_form(build.stages[RUNTIME].last("CMD").text)
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    expected = f"configuration error: set {unset} or install orders-stream[embedded]"
    assert (done.returncode, done.stderr.strip()) == (2, expected), done.stdout + done.stderr


def test_the_test_stage_installs_the_test_tools(
    build: Build, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """test-wheels and test: the base stage again in a venv of its own, then the test extra,
    which brings the embedded servers the suite starts."""
    stages = build.stages
    assert stages[TEST_WHEELS].parent == BUILDER and stages[TEST].parent == BASE
    root = tmp_path_factory.mktemp("test-image")
    src, wheels, venv = root / "src", root / "wheels", root / "venv"
    try:
        copy_build_context(stages[BUILDER], src)
        shutil.copytree(build.wheels, wheels)
        run_stage(stages, TEST_WHEELS, {"/src": src, "/wheels": wheels}, {}, root)
        run_stage(stages, BASE, {"/opt/venv": venv}, {BUILDER: build.wheels}, root)
        run_stage(stages, TEST, {"/opt/venv": venv}, {TEST_WHEELS: wheels}, root)
        for tool in ("pytest", "hadolint", "check-jsonschema", "ruff", "mypy"):
            done = subprocess.run(
                [str(venv / "bin" / tool), "--version"], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, f"{tool}: {done.stdout}{done.stderr}"
        # The suite starts embedded servers of its own: the test extra brings the embedded one.
        imported = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import pgserver"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        assert (venv / "bin" / "nats-server").is_file(), "the test image has no nats-server"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert exec_form(stages[TEST].last("CMD").text)[0] == "pytest"
