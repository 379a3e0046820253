"""The operations package, checked by the real tools: hadolint, kustomize (kubectl's), kubernetes-
validate, promtool, uv; the image's install done the way the Dockerfile does it (hash-pinned locks,
then the wheel), run as a non-root user, as PID 1 of its own PID namespace under dumb-init."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RUNBOOK = (DEPLOY / "RUNBOOK.md").read_text()
RUNBOOK_URL = "https://github.com/example/ac-audience-sync/blob/main/deploy/RUNBOOK.md"
CREDENTIAL = re.compile(r"TOKEN|PASSWORD|SASL_USERNAME|USER_INFO|SECRET|HASH_KEY|PRIVATE_KEY")
SERVICE_JOB = "ac-audience-sync"


def run(
    *cmd: str, cwd: Path = ROOT, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


# ---- the image -------------------------------------------------------------------------------


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_instructions() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in dockerfile().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def entrypoint() -> list[str]:
    [line] = [i for i in dockerfile_instructions() if i.startswith("ENTRYPOINT ")]
    return list(json.loads(line.removeprefix("ENTRYPOINT ")))


def test_dockerfile_is_hadolint_clean() -> None:
    result = run(str(BIN / "hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_under_an_init_with_the_run_entrypoint() -> None:
    text = dockerfile()
    assert re.search(r"^USER 10001", text, re.M)
    # dumb-init is PID 1 and forwards SIGTERM: a Python PID 1 would ignore it until it installs
    # a handler (test_sigterm_during_start_up_stops_the_entrypoint below shows both).
    assert entrypoint() == ["dumb-init", "--", "ac-audience-sync", "run"]
    assert "EXPOSE 9108" in text
    assert "HEALTHCHECK" not in text
    assert text.count("\nFROM ") == 2  # multi-stage


def test_dockerfile_installs_only_from_hash_pinned_locks() -> None:
    runs = [i for i in dockerfile_instructions() if i.startswith("RUN ")]
    installs = [
        part.strip()
        for i in runs
        for part in i.removeprefix("RUN ").split("&&")
        if "pip install" in part or "pip wheel" in part
    ]
    assert len(installs) == 4, installs
    for command in installs:
        if "-r " in command:  # a lock: every file checked against its hashes, nothing unlisted
            assert "--require-hashes" in command and "--no-deps" in command, command
            assert re.search(r"-r \S*requirements(-build)?\.lock\b", command), command
        elif "pip wheel" in command:  # the service's own wheel, by the locked build backend
            assert "--no-deps" in command and "--no-build-isolation" in command, command
        else:  # the service's wheel, whatever its version; its dependencies are already there
            assert "--no-deps" in command and "/wheels/ac_audience_sync-*.whl" in command, command
    assert any("pip check" in i for i in runs)


def test_dockerfile_carries_oci_labels_and_no_version_by_hand() -> None:
    labels = dict(
        re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', dockerfile(), re.M)
    )
    for name in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{name}"), name
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    # The version is pyproject's alone: the build checks the wheel's file name against VERSION.
    assert VERSION not in dockerfile()
    assert "ac_audience_sync-${VERSION:?" in dockerfile()


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list
    admitted = {line[1:] for line in lines if line.startswith("!")}
    copied = {
        source
        for i in dockerfile_instructions()
        if i.startswith("COPY ") and "--from=" not in i
        for source in i.split()[1:-1]
    }
    assert admitted == copied
    for path in admitted:
        assert (ROOT / path).exists(), path


def lock_entries(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {version, hashes, via} from a uv/pip-compile lock file."""
    entries: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    in_via = False
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if pin:
            current = {"version": pin.group(2), "hashes": [], "via": set()}
            entries[canonicalize_name(pin.group(1))] = current
            in_via = False
        elif current is not None and "--hash=sha256:" in line:
            current["hashes"].append(line.split("--hash=sha256:")[1].split()[0])
        elif current is not None and re.match(r"^\s+# via\s*$", line):
            in_via = True
        elif current is not None and re.match(r"^\s+# via ", line):
            current["via"].add(line.split("# via ", 1)[1].strip())
        elif current is not None and in_via and re.match(r"^\s+#   ", line):
            current["via"].add(line.split("#   ", 1)[1].strip())
    return entries


def requirements_in(path: Path) -> list[Requirement]:
    return [
        Requirement(line)
        for line in (ROOT / path).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_lock_pins_exactly_pyprojects_dependencies_with_hashes() -> None:
    lock = lock_entries(ROOT / "requirements.lock")
    declared = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    extra = requirements_in(Path("deploy/image/runtime.in"))
    direct = {n for n, e in lock.items() if "ac-audience-sync (pyproject.toml)" in e["via"]}
    assert direct == {canonicalize_name(r.name) for r in declared}
    assert {n for n, e in lock.items() if "-r deploy/image/runtime.in" in e["via"]} == {
        canonicalize_name(r.name) for r in extra
    }
    for requirement in declared + extra:
        pinned = lock[canonicalize_name(requirement.name)]["version"]
        assert requirement.specifier.contains(pinned, prereleases=True), (requirement, pinned)
    for name, entry in lock.items():
        assert entry["hashes"], name
        assert entry["via"], name  # every pin is needed by something


def test_build_lock_pins_the_build_backend_of_pyproject() -> None:
    build_in = requirements_in(Path("deploy/image/build.in"))
    assert sorted(str(r) for r in build_in) == sorted(
        str(Requirement(r)) for r in PYPROJECT["build-system"]["requires"]
    )
    lock = lock_entries(ROOT / "requirements-build.lock")
    for requirement in build_in:
        pinned = lock[canonicalize_name(requirement.name)]["version"]
        assert requirement.specifier.contains(pinned), (requirement, pinned)
    assert all(entry["hashes"] for entry in lock.values())


def test_locks_are_what_their_documented_command_produces() -> None:
    """``deploy/image/update-locks --check`` re-resolves (keeping the pins) and diffs."""
    check = run(
        str(ROOT / "deploy/image/update-locks"),
        "--check",
        env={**os.environ, "UV": str(BIN / "uv")},
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_version_comes_from_pyproject() -> None:
    import service

    assert service.__version__ == VERSION
    base = yaml.safe_load((DEPLOY / "base/deployment.yaml").read_text())
    assert ":" not in base["spec"]["template"]["spec"]["containers"][0]["image"]
    overlay = yaml.safe_load((DEPLOY / "overlays/production/kustomization.yaml").read_text())
    assert [i["newTag"] for i in overlay["images"]] == [VERSION]


def _unprivileged(command: list[str]) -> list[str]:
    """As root (CI), drop to nobody exactly like USER in the Dockerfile."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *command]
    return command


@pytest.fixture(scope="module")
def image_venv() -> Iterator[Path]:
    """The runtime stage's install: the build backend from its lock builds the wheel; the
    dependencies from the lock with hashes; the wheel by file-name glob; ``pip check``."""
    work = Path(tempfile.mkdtemp(prefix="image-"))
    os.chmod(work, 0o755)
    try:
        build_venv, venv, wheels = work / "build", work / "venv", work / "wheels"
        for path in (build_venv, venv):
            assert run(sys.executable, "-m", "venv", str(path)).returncode == 0
        quiet = ["--quiet", "--no-cache-dir", "--disable-pip-version-check"]
        locked = ["install", *quiet, "--require-hashes", "--no-deps", "-r"]
        backend = run(str(build_venv / "bin/pip"), *locked, str(ROOT / "requirements-build.lock"))
        assert backend.returncode == 0, backend.stderr
        build = run(
            str(build_venv / "bin/pip"),
            "wheel",
            *quiet,
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        )
        assert build.returncode == 0, build.stderr
        [wheel] = wheels.glob("ac_audience_sync-*.whl")
        assert wheel.name == f"ac_audience_sync-{VERSION}-py3-none-any.whl"
        deps = run(str(venv / "bin/pip"), *locked, str(ROOT / "requirements.lock"))
        assert deps.returncode == 0, deps.stderr
        own = run(str(venv / "bin/pip"), "install", *quiet, "--no-deps", str(wheel))
        assert own.returncode == 0, own.stderr
        check = run(str(venv / "bin/pip"), "check")  # the lock holds everything the wheel needs
        assert check.returncode == 0, check.stdout + check.stderr
        for path in [work, *work.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o755)
        yield venv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_image_install_is_the_lock_and_runs_as_non_root(image_venv: Path) -> None:
    frozen = run(str(image_venv / "bin/pip"), "list", "--format=json")
    installed = {
        canonicalize_name(p["name"]): p["version"]
        for p in json.loads(frozen.stdout)
        if canonicalize_name(p["name"]) not in {"pip", "setuptools", "wheel"}
    }
    pinned = {n: e["version"] for n, e in lock_entries(ROOT / "requirements.lock").items()}
    assert installed == {**pinned, "ac-audience-sync": VERSION}
    helped = run(
        *_unprivileged([str(image_venv / "bin/ac-audience-sync"), "--help"]), cwd=Path("/")
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: ac-audience-sync" in helped.stdout
    probe = (
        "import importlib.metadata, importlib.resources, json, os, service;"
        "schemas = importlib.resources.files('service').joinpath('schemas');"
        "[json.loads(schemas.joinpath(n).read_text()) for n in"
        " ('segment_membership_change.avsc', 'ledger_entry.avsc')];"
        "print(os.geteuid(), service.__version__, importlib.metadata.version('ac-audience-sync'))"
    )
    result = run(*_unprivileged([str(image_venv / "bin/python"), "-c", probe]), cwd=Path("/"))
    assert result.returncode == 0, result.stderr  # the schemas ship inside the wheel
    uid, version, distribution = result.stdout.split()
    assert uid != "0"
    assert version == distribution == VERSION


def _pid1(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``command`` as PID 1 of a new PID namespace, as a container runtime starts it. (As root,
    the namespace's user stays root: what PID 1 does with SIGTERM does not depend on the user.)"""
    prefix = ["unshare", "--pid", "--fork", "--kill-child", "--"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    return subprocess.Popen(
        [*prefix, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/", env=env
    )


def _namespace_init(unshare: subprocess.Popen[bytes]) -> int:
    """The host pid of the namespace's PID 1 (unshare's only child)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        kids = children.read_text().split() if children.exists() else []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("no PID 1 in the new namespace")


def _sigterm_after(unshare: subprocess.Popen[bytes], delay: float, limit: float) -> float | None:
    """Seconds from SIGTERM to exit, or None if still running after ``limit`` seconds."""
    init = _namespace_init(unshare)
    time.sleep(delay)
    assert unshare.poll() is None, unshare.stderr.read().decode() if unshare.stderr else ""
    sent = time.monotonic()
    os.kill(init, signal.SIGTERM)
    try:
        unshare.wait(limit)
        return time.monotonic() - sent
    except subprocess.TimeoutExpired:
        return None
    finally:
        if unshare.poll() is None:
            unshare.kill()
            unshare.wait(10)
        if unshare.stderr:
            unshare.stderr.close()


def test_sigterm_during_start_up_stops_the_entrypoint(image_venv: Path, tmp_path: Path) -> None:
    """The kubelet's SIGTERM while the service is still starting (here: waiting up to 10 s for a
    broker that does not answer) ends it at once, well inside the pod's grace period."""
    # The control: a Python process that is PID 1 with no handler ignores SIGTERM. This is what
    # the test would see without dumb-init, and shows the namespace really makes it PID 1.
    control = _pid1([str(image_venv / "bin/python"), "-c", "import time; time.sleep(30)"])
    assert _sigterm_after(control, 0.5, 2.0) is None

    token = tmp_path / "token"
    token.write_text("t0ken")
    config = dotenv(DEPLOY / "base/config.env")
    environment = {
        **config,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # discard port: nothing answers
        "AC_API_URL": "http://127.0.0.1:9",
        "AC_API_TOKEN_FILE": str(token),
        "METRICS_PORT": "0",
        "PATH": f"{image_venv / 'bin'}:/usr/bin:/bin",
    }
    service = _pid1(entrypoint(), env=environment)
    took = _sigterm_after(service, 1.5, float(config["SHUTDOWN_GRACE_SECONDS"]))
    assert took is not None, "SIGTERM during start-up was ignored"
    assert took < float(config["SHUTDOWN_GRACE_SECONDS"])


class _FakeHealth(BaseHTTPRequestHandler):
    """Answers like the service's health server: JSON, 503 when not ready."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        status, body = {
            "/healthz": (200, {"ok": True, "loop_age_seconds": 0.1}),
            "/readyz": (503, {"ok": False, "assigned_partitions": 0, "broker_connected": True}),
        }.get(self.path, (404, {}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def runbook_programs() -> list[tuple[str, list[str]]]:
    """Every ``python -c '...' ARGS`` the runbook runs inside the pod: (program, args)."""
    programs = re.findall(r"-- python -c '(.*?)'(.*?)(?:`|$)", RUNBOOK, re.S | re.M)
    return [(program, args.split()) for program, args in programs]


def test_runbook_commands_work_inside_the_image(image_venv: Path) -> None:
    assert not re.search(r"\b(wget|curl)\b.*localhost|exec .*-- (wget|curl)", RUNBOOK)
    helped = run(str(image_venv / "bin/ac-audience-sync"), "--help").stdout
    subcommands = set(re.findall(r"-- ac-audience-sync (\w+)", RUNBOOK))
    assert subcommands >= {"check", "explain", "reconcile"}
    for sub in subcommands:
        assert re.search(rf"^\s+{sub}\s", helped, re.M), sub
    programs = runbook_programs()
    probes = [(p, a) for p, a in programs if "urlopen" in p]
    assert [a for _, a in probes] == [["readyz"]]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        environment = {"METRICS_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}
        python = str(image_venv / "bin/python")
        for args, expected in ((["readyz"], "503"), (["healthz"], "200")):
            [(program, _)] = probes
            result = run(*_unprivileged([python, "-c", program, *args]), env=environment)
            assert result.returncode == 0, result.stderr
            status, body = result.stdout.split(" ", 1)
            assert status == expected
            assert "ok" in json.loads(body)
    finally:
        server.shutdown()
        server.server_close()
    dumps = [p for p, _ in programs if "SIGUSR1" in p]
    assert dumps and all("os.kill(1," in p for p in dumps)  # PID 1 is dumb-init; it forwards


# ---- the manifests ---------------------------------------------------------------------------


def dotenv(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def kubectl() -> str:
    binary = shutil.which("kubectl")
    assert binary, "kubectl (with its built-in kustomize) is on this kind of machine"
    return binary


def render(directory: Path) -> list[dict[str, Any]]:
    result = run(kubectl(), "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def every_component(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with an overlay of the production overlay plus every component."""
    copy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, copy)
    components = sorted(p.name for p in (DEPLOY / "components").iterdir() if p.is_dir())
    overlay = copy / "overlays/every-component"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../production"],
                "components": [f"../../components/{c}" for c in components],
            }
        )
    )
    return overlay


KUSTOMIZATIONS = ["base", "overlays/production"]


def renders(every_component: Path) -> dict[str, list[dict[str, Any]]]:
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    components = {f"components/{p.name}" for p in (DEPLOY / "components").iterdir()}
    assert found - components == set(KUSTOMIZATIONS)  # every kustomization is checked here
    out = {name: render(DEPLOY / name) for name in KUSTOMIZATIONS}
    out["every component"] = render(every_component)
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def config_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    config: dict[str, str] = one(docs, "ConfigMap")["data"]
    return config


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container


CORE_FILES = ["deployment.yaml", "service.yaml", "poddisruptionbudget.yaml", "networkpolicy.yaml"]


@pytest.mark.parametrize("name", CORE_FILES)
def test_base_manifests_validate_against_current_kubernetes(name: str) -> None:
    result = run(
        str(BIN / "kubernetes-validate"), "--strict", "-k", "1.37.0", str(DEPLOY / "base" / name)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rendered_kustomization_validates(every_component: Path, tmp_path: Path) -> None:
    for name, docs in renders(every_component).items():
        assert {d["kind"] for d in docs} >= {
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        }, name
        rendered = tmp_path / f"{name.replace('/', '-').replace(' ', '-')}.yaml"
        core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
        rendered.write_text(yaml.safe_dump_all(core))
        result = run(str(BIN / "kubernetes-validate"), "--strict", "-k", "1.37.0", str(rendered))
        assert result.returncode == 0, name + result.stdout + result.stderr
        assert "passed" in result.stdout + result.stderr


def test_the_runbooks_tools_pod_runs_the_service_configuration_outside_its_selectors(
    every_component: Path, tmp_path: Path
) -> None:
    """RUNBOOK "Erasure requests": the one-off pod ``forget`` runs in while the service is
    scaled to zero. Built from each rendered Deployment by the runbook's own program: a valid
    Pod with the service's image, configuration and mounted Secrets, no probes (it sleeps), and
    labels neither the ReplicaSet (which would adopt and delete it) nor the Service select."""
    [program] = re.findall(r"python3 -c '\n(.*?)\n' \|", RUNBOOK, re.S)
    for name, docs in renders(every_component).items():
        deployment = one(docs, "Deployment")
        made = subprocess.run(
            [sys.executable, "-c", program],
            input=json.dumps(deployment),
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        pod = json.loads(made.stdout)
        rendered = tmp_path / f"tools-{name.replace('/', '-').replace(' ', '-')}.yaml"
        rendered.write_text(yaml.safe_dump(pod))
        result = run(str(BIN / "kubernetes-validate"), "--strict", "-k", "1.37.0", str(rendered))
        assert result.returncode == 0, name + result.stdout + result.stderr
        template = deployment["spec"]["template"]["spec"]
        [container] = pod["spec"]["containers"]
        service = template["containers"][0]
        assert container["command"] == ["sleep", "3600"]
        assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(container)
        for key in ("image", "envFrom", "env", "volumeMounts", "securityContext"):
            assert container.get(key) == service.get(key), (name, key)
        assert pod["spec"].get("volumes") == template.get("volumes")
        assert pod["spec"]["securityContext"] == template["securityContext"]
        labels = pod["metadata"]["labels"]
        for selector in (
            deployment["spec"]["selector"]["matchLabels"],
            one(docs, "Service")["spec"]["selector"],
        ):
            assert not all(labels.get(k) == v for k, v in selector.items()), name


def test_base_lists_every_manifest_and_overlay_points_at_base() -> None:
    kustomization = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())
    on_disk = {p.name for p in (DEPLOY / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    overlay = yaml.safe_load((DEPLOY / "overlays/production/kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    for component in overlay["components"]:
        assert (DEPLOY / "overlays/production" / component / "kustomization.yaml").exists()


def test_no_kustomization_renders_a_secret_or_a_placeholder(every_component: Path) -> None:
    for name, docs in renders(every_component).items():
        assert "Secret" not in {d["kind"] for d in docs}, name
        assert "REPLACE" not in yaml.safe_dump_all(docs), name
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for entry in spec.get("resources", []) + spec.get("components", []):
            assert "examples" not in entry, kustomization


def test_every_credential_comes_from_a_file_mounted_from_a_secret(every_component: Path) -> None:
    for name, docs in renders(every_component).items():
        config = config_of(docs)
        assert not [k for k in config if CREDENTIAL.search(k)], name
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        secret_files = {}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            secret = volumes[mount["name"]].get("secret")
            if secret:  # items name every file: no other key of the Secret lands in the pod
                for item in secret["items"]:
                    secret_files[f"{mount['mountPath']}/{item['path']}"] = secret["secretName"]
        credentials = [e for e in container["env"] if CREDENTIAL.search(e["name"])]
        assert credentials, name
        for variable in credentials:
            assert variable["name"].endswith("_FILE"), (name, variable)
            assert variable["value"] in secret_files, (name, variable)
        names = {e["name"] for e in container["env"]}
        if config.get("KAFKA_PROPERTY_SECURITY_PROTOCOL", "").startswith("SASL"):
            assert {
                "KAFKA_PROPERTY_SASL_USERNAME_FILE",
                "KAFKA_PROPERTY_SASL_PASSWORD_FILE",
            } <= names, name


def test_config_edits_roll_the_pods(tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)

    def config_ref() -> tuple[str, list[dict[str, Any]]]:
        docs = render(copy / "overlays/production")
        [ref] = container_of(docs)["envFrom"]
        return ref["configMapRef"]["name"], docs

    before, _ = config_ref()
    with (copy / "overlays/production/config.env").open("a") as env:
        env.write("LOG_LEVEL=DEBUG\n")
    after, docs = config_ref()
    assert before != after  # a new name in the pod template: a rollout
    assert one(docs, "ConfigMap")["metadata"]["name"] == after
    assert config_of(docs)["LOG_LEVEL"] == "DEBUG"


def test_deployment_promises() -> None:
    docs = render(DEPLOY / "overlays/production")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = config_of(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Room for the final commit and close after the shutdown grace.
    assert pod["terminationGracePeriodSeconds"] >= float(config["SHUTDOWN_GRACE_SECONDS"]) + 20
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]  # the ledger stays
    assert "cpu" not in resources["limits"]
    assert float(resources["requests"]["cpu"]) >= 1  # the ledger restore runs one core flat out
    assert container["image"] == f"registry.example.com/crm/ac-audience-sync:{VERSION}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(config["METRICS_PORT"])


def _allows(rule: dict[str, Any], port: int | str, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    return ports is None or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def test_networkpolicy_admits_what_the_configuration_needs(every_component: Path) -> None:
    for name, docs in renders(every_component).items():
        policy = one(docs, "NetworkPolicy")["spec"]
        config = config_of(docs)
        container = container_of(docs)
        assert (
            policy["podSelector"]["matchLabels"]
            == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
        )
        assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
        [ingress] = policy["ingress"]
        assert _allows(ingress, "metrics") and "from" not in ingress
        assert any(p["name"] == "metrics" for p in container["ports"])
        egress = policy["egress"]
        assert any(_allows(r, 53, "UDP") and "to" not in r for r in egress), name
        for server in config["KAFKA_BOOTSTRAP_SERVERS"].split(","):
            host, _, port = server.rpartition(":")
            namespace = host.split(".")[1]  # <service>.<namespace>.svc
            assert any(
                _allows(rule, int(port))
                and any(
                    peer.get("namespaceSelector", {}).get("matchLabels")
                    == {"kubernetes.io/metadata.name": namespace}
                    for peer in rule.get("to", [])
                )
                for rule in egress
            ), (name, server)
        api = urlsplit(config["AC_API_URL"])
        assert api.scheme == "https" and api.port is None
        assert any(
            _allows(rule, 443)
            and any(peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for peer in rule["to"])
            for rule in egress
            if "to" in rule
        ), name


def test_prometheus_operator_objects_carry_the_selector_labels() -> None:
    docs = render(DEPLOY / "overlays/production")
    monitor, rule, service = (one(docs, k) for k in ("ServiceMonitor", "PrometheusRule", "Service"))
    for obj in (monitor, rule):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The job label the alerts select on comes from the Service's label, whatever its name.
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == SERVICE_JOB
    assert f'up{{job="{job}"}}' in (DEPLOY / "prometheus/rules.yml").read_text()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def readme_deploy() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Deploy") : readme.index("### Replicas")]


def secrets_created(text: str) -> dict[str, set[str]]:
    """Secret name -> keys, from the ``kubectl ... create secret generic`` commands in ``text``
    (each command with its continuation lines)."""
    created: dict[str, set[str]] = {}
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if "create secret generic" not in line:
            continue
        command, number = line, start
        while command.endswith("\\") and number + 1 < len(lines):
            number += 1
            command = command[:-1] + lines[number]
        command = command.split("create secret generic", 1)[1].split("| kubectl apply")[0]
        created[command.split()[0]] = set(re.findall(r"--from-(?:literal|file)=([\w-]+)=", command))
    return created


def secrets_mounted(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return {
        v["secret"]["secretName"]: {i["key"] for i in v["secret"]["items"]}
        for v in pod["volumes"]
        if "secret" in v
    }


def test_readme_deploy_steps_create_what_the_overlay_mounts() -> None:
    text = readme_deploy()
    docs = render(DEPLOY / "overlays/production")
    overlay = yaml.safe_load((DEPLOY / "overlays/production/kustomization.yaml").read_text())
    assert f"kubectl create namespace {overlay['namespace']}" in text
    assert secrets_created(text) == secrets_mounted(docs)
    assert "kubectl apply -k deploy/overlays/production" in text
    for path in re.findall(r"`((?:deploy/|Dockerfile)[\w./-]*)`", text):
        assert (ROOT / path.rstrip("/")).exists(), path
    # The runbook's rotations write the same Secrets and keys, and apply nothing else.
    for name, keys in secrets_created(RUNBOOK).items():
        assert keys == secrets_mounted(render(DEPLOY / "overlays/production")).get(name), name
    rotation = RUNBOOK.split("## Secrets and their rotation")[1].split("\n## ")[0]
    commands = "".join(re.findall(r"```sh\n(.*?)```", rotation, re.S))
    assert "create secret generic" in commands and "apply -k" not in commands


# ---- alerts ----------------------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())[
        "groups"
    ]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def runbook_sections() -> set[str]:
    return {h.lower() for h in re.findall(r"^## (\S+)$", RUNBOOK, re.M)}


def test_prometheusrule_carries_exactly_the_plain_rules() -> None:
    operator = yaml.safe_load((DEPLOY / "base/prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == rule_groups(), "run deploy/prometheus/to-prometheusrule"


def test_every_alert_explains_itself_and_links_to_its_runbook_section() -> None:
    sections = runbook_sections()
    for rule in alerts():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert len(annotations["description"]) > 80, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        url, anchor = annotations["runbook_url"].split("#")
        assert url == RUNBOOK_URL
        assert anchor == rule["alert"].lower() and anchor in sections, rule["alert"]


def test_promtool_check_and_unit_tests_for_every_alert() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/install-test-deps"
    check = run(promtool, "check", "rules", str(DEPLOY / "prometheus/rules.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    test = run(promtool, "test", "rules", str(DEPLOY / "prometheus/rules.test.yml"))
    assert test.returncode == 0, test.stdout + test.stderr
    cases = yaml.safe_load((DEPLOY / "prometheus/rules.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for t in cases
        for case in t.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for t in cases
        for case in t.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    names = {r["alert"] for r in alerts()}
    assert fired == names  # every alert fires in some scenario
    assert quiet == names  # and stays quiet in another (or before its time)


def test_the_availability_alerts_need_no_series_from_the_pod() -> None:
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alerts()}
    assert exprs["AcSyncTargetDown"] == f'up{{job="{SERVICE_JOB}"}} == 0'
    assert exprs["AcSyncAbsent"] == f'absent(up{{job="{SERVICE_JOB}"}})'
    assert "kube_pod_container_status_restarts_total" in exprs["AcSyncRestarting"]


def test_the_stall_alert_fires_before_liveness_restarts_the_pod() -> None:
    """Latest firing: heartbeat threshold + a scrape interval + an evaluation interval (30 s,
    kube-prometheus-stack's default) + `for`. Earliest restart: /healthz fails at a loop age of
    60 s (the service's limit), then failureThreshold - 1 more probe periods."""
    [stall] = [r for r in alerts() if r["alert"] == "AcSyncMainLoopStalled"]
    threshold = float(re.search(r"\)\s*>\s*(\d+)\s*$", stall["expr"]).group(1))  # type: ignore[union-attr]
    assert "for" not in stall and stall["keep_firing_for"] == "10m"
    docs = render(DEPLOY / "overlays/production")
    scrape = float(one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["interval"].rstrip("s"))
    liveness = container_of(docs)["livenessProbe"]
    restart = 60 + (liveness["failureThreshold"] - 1) * liveness["periodSeconds"]
    assert threshold + scrape + 30 < restart


# ---- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana/ac-audience-sync.json").read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_is_templated_and_covers_the_asks() -> None:
    dash = dashboard()
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"namespace", "pod", "account_limit"} <= names
    exprs = " ".join(t["expr"] for p in panels() for t in p.get("targets", []))
    for metric in (
        "ac_sync_events_consumed_total",
        "ac_sync_changes_applied_total",
        "ac_sync_events_coalesced_total",
        "ac_sync_consumer_lag",
        "ac_sync_ac_requests_total",
        "ac_sync_ac_rate_limited_total",
        "ac_sync_ac_request_duration_seconds_bucket",
        "ac_sync_ratelimit_wait_seconds_bucket",
        "ac_sync_ratelimit_rate_per_second",
        "ac_sync_dlq_records_total",
        "ac_sync_changes_pending",
        "ac_sync_event_to_applied_seconds_bucket",
        "ac_sync_auth_rejected",
        "ac_sync_imports_total",
        "ac_sync_import_budget_left",
        "ac_sync_gc_pause_seconds_bucket",
        "ac_sync_main_loop_heartbeat_timestamp_seconds",
        # the process collector: CPU and RSS
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        # the SLO recording rules
        "namespace:ac_sync_events_applied_late:ratio_rate1h",
        "namespace:ac_sync_ac_request_errors:ratio_rate1h",
    ):
        assert metric in exprs, metric
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    for name in re.findall(r"\b(namespace:[a-z_]+:[a-z0-9_]+)", exprs):
        assert name in recorded, name


def test_every_panel_is_described_and_links_resolve_to_runbook_sections() -> None:
    dash = dashboard()
    sections = runbook_sections() | {
        # GitHub anchors of the non-alert sections: lower case, spaces to dashes
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^## (.+)$", RUNBOOK, re.M)
    }
    assert dash["description"]
    assert [link["url"] for link in dash["links"]] == [RUNBOOK_URL]
    linked = 0
    for panel in panels():
        assert len(panel.get("description", "")) > 40, panel["title"]
        for link in panel.get("links", []):
            url, anchor = link["url"].split("#")
            assert url == RUNBOOK_URL and anchor in sections, (panel["title"], anchor)
            linked += 1
    assert linked >= 10


def test_dashboard_units_are_consistent_and_no_limit_is_hard_coded() -> None:
    per_second = {"ops", "reqps"}
    for panel in panels():
        unit = panel["fieldConfig"]["defaults"].get("unit")
        exprs = [t["expr"] for t in panel["targets"]]
        title = panel["title"]
        assert unit, title
        # One time base per panel: per-second rates, or counts over a window the title names.
        assert not (any("rate(" in e for e in exprs) and any("increase(" in e for e in exprs)), (
            title
        )
        for window in {w for e in exprs for w in re.findall(r"increase\(.*?\[(\w+)\]", e)}:
            minutes = {"1m": "per minute", "10m": "per 10 minutes"}[window]
            assert minutes in title, title
        if "/ s" in title:
            assert unit in per_second, title
            assert all("rate(" in e for e in exprs), title
        if unit in per_second:
            assert "/ s" in title or "rate" in title.lower(), title
        if all(e.startswith("histogram_quantile(") for e in exprs):
            assert all("_seconds_bucket" in e for e in exprs) and unit == "s", title
        if any("_bytes" in e for e in exprs):
            assert unit == "bytes", title
        if any(":ratio_rate" in e for e in exprs) or "ratio" in title.lower():
            assert unit == "percentunit", title
        for expr in exprs:
            # No hard-coded limit: the account's comes from a variable, the rate from the gauge.
            assert not re.search(r"vector\(\s*[\d.]+\s*\)", expr), title
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    assert "vector($account_limit)" in exprs
