"""Static checks of the deployment files: cluster.yaml, deploy/ (image, KubeRay, MLflow, PostgreSQL,
docker compose).

cluster.yaml goes through Ray's own schema (the private ``prepare_config`` + ``validate_config``
that ``ray up`` runs) with every socket connection refused, so the check provably stays offline.
The Kubernetes and compose files are parsed and checked for what breaks a deployment silently:
images and versions, commands and flags, environment, token auth, secrets only by reference.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def tested_versions() -> dict[str, str]:
    """``{package: version}`` of constraints.txt, the tested versions (names lower-cased)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


# Versions the deployment must pin: the tested ones of constraints.txt (never those of whatever
# environment runs this test: a fresh install must not make it fail, nor a stale one pass).
PACKAGE_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TESTED = tested_versions()
RAY_VERSION = TESTED["ray"]
TORCH_VERSION = TESTED["torch"]
MLFLOW_VERSION = TESTED["mlflow"]
OPTUNA_VERSION = TESTED["optuna"]

SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
# scheme://user:password@host: a credential written into a URL.
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@", re.IGNORECASE)
# Deployment URLs name their driver (psycopg2) so they do not depend on SQLAlchemy's default for postgresql://.
PG_URL = "postgresql+psycopg2://"
ENV_REFERENCE = re.compile(r"^\$\{(\w+)(:?[?-][^}]*)?\}$")


# --------------------------------------------------------------------------- helpers


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a Kubernetes object (Deployment, StatefulSet, RayCluster, RayJob)."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    if doc["kind"] in {"RayCluster", "RayJob"}:
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [group["template"]["spec"] for group in groups]
    return [spec["template"]["spec"]]


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def flags(argv: list[str]) -> dict[str, str | None]:
    """``--name=value`` / ``--name value`` / ``--switch`` -> {name: value or None}."""
    parsed: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            parsed[name] = value if (eq or value) else None
        i += 1
    return parsed


def secrets_in_example() -> dict[str, set[str]]:
    docs = load_all(K8S / "secrets.example.yaml")
    return {d["metadata"]["name"]: set(d["stringData"]) for d in docs if d["kind"] == "Secret"}


def assert_mlflow_server(argv: list[str], expected_hosts: list[str]) -> None:
    """The MLflow tracking server flags the deployment relies on."""
    from mlflow.server.security_utils import is_allowed_host_header

    assert argv[:2] == ["mlflow", "server"], argv
    opts = flags(argv[2:])
    backend = opts["backend-store-uri"]
    assert backend.startswith(PG_URL), backend
    assert not URL_WITH_PASSWORD.search(backend), "the store URI must not hold the password"
    assert opts.get("artifacts-destination"), "artifacts need a destination (bucket or volume)"
    assert "no-serve-artifacts" not in opts, "clients must reach artifacts through the server"
    assert opts.get("app-name") == "basic-auth"
    assert opts.get("host") == "0.0.0.0"
    allowed = opts["allowed-hosts"].split(",")
    assert "*" not in allowed, "a wildcard allow-list disables the DNS-rebinding protection"
    for host in expected_hosts:
        assert is_allowed_host_header(allowed, host), f"{host} rejected by {allowed}"
    assert not is_allowed_host_header(allowed, "attacker.example.com:5000")


# --------------------------------------------------------------------------- cluster.yaml


@pytest.fixture
def offline(monkeypatch):
    """Refuse every outgoing connection: a cloud call would fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture
def prepared_cluster_config(cluster_config, offline) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster_config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema_offline(prepared_cluster_config):
    config = prepared_cluster_config
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0 for t in workers.values())
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU workers must be optional"
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]


def test_cluster_yaml_schema_rejects_a_broken_config(cluster_config, offline):
    """The validation used above is not vacuous: an unknown field fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = yaml.safe_load(yaml.safe_dump(cluster_config))
    broken["available_node_types"]["gpu"]["num_gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_pins_the_driver_versions(prepared_cluster_config):
    setup = " ".join(prepared_cluster_config["worker_setup_commands"])
    assert setup == " ".join(prepared_cluster_config["setup_commands"])  # no per-type override
    for pin in (
        f'"landscape-sweeps=={PACKAGE_VERSION}"',
        f'"ray[default]=={RAY_VERSION}"',
        f'"torch=={TORCH_VERSION}"',
        f'"mlflow[auth]=={MLFLOW_VERSION}"',
        f'"optuna=={OPTUNA_VERSION}"',
    ):
        assert pin in setup, f"cluster.yaml must install {pin} (the driver's version)"
    assert "--python 3.11" in setup, "the nodes must run the driver's Python minor version"


def test_cluster_yaml_commands_are_valid_shell_and_python(prepared_cluster_config):
    config = prepared_cluster_config
    commands = [
        *config["head_setup_commands"],
        *config["worker_setup_commands"],
        *config["head_start_ray_commands"],
        *config["worker_start_ray_commands"],
    ]
    for command in commands:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"
    fetch = next(c for c in config["head_setup_commands"] if "secretsmanager" in c)
    words = shlex.split(fetch)
    code = words[words.index("-c") + 1]
    compile(code, "head_setup_commands", "exec")


def test_cluster_yaml_environment_comes_from_a_secret_not_the_file(prepared_cluster_config):
    config = prepared_cluster_config
    text = (ROOT / "cluster.yaml").read_text()
    assert not URL_WITH_PASSWORD.search(text)
    assert not re.search(r"(PASSWORD|TOKEN)\s*[=:]\s*\S", text.replace("RAY_AUTH_TOKEN", "")), (
        "no credential values in cluster.yaml"
    )
    env_file = "~/.sweeps/cluster.env"
    fetch = " ".join(config["head_setup_commands"])
    assert "get_secret_value" in fetch and env_file in fetch and "umask 077" in fetch
    assert '"RAY_AUTH_MODE": "token"' in fetch
    assert any(env_file.replace("~", "/home/ubuntu") == p for p in config["cluster_synced_files"])
    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert f". {env_file}" in command and "ray start" in command, command
    # The documented keys: the service reads these two from the environment.
    for key in ("MLFLOW_TRACKING_URI", "SWEEPS_STORAGE", "RAY_AUTH_TOKEN", "PGPASSWORD"):
        assert key in text
    assert "postgresql://" not in text.replace(PG_URL, ""), f"database URLs must start with {PG_URL}"


# --------------------------------------------------------------------------- container image


def dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))


def test_dockerfile_installs_the_package_with_pinned_versions():
    text = (DEPLOY / "Dockerfile").read_text()
    args = dockerfile_args()
    assert args["BASE_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    assert args["TORCH_VERSION"] == TORCH_VERSION
    assert args["RAY_VERSION"] == RAY_VERSION
    assert args["MLFLOW_VERSION"] == MLFLOW_VERSION
    assert args["OPTUNA_VERSION"] == OPTUNA_VERSION
    assert args["TORCH_VARIANT"] == "cpu"
    run = text[text.index("RUN python -m pip install") :]
    assert '"torch==${TORCH_VERSION}"' in run
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in run
    assert 'python -m pip install ".[dashboard]"' in run
    assert '"ray[default]==${RAY_VERSION}"' in run
    # The CUDA variant is the same file with two build arguments.
    assert f"BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cu" in text and "TORCH_VARIANT=cu" in text
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    assert re.search(r"^USER ray$", text, flags=re.MULTILINE), "the image must not run as root"


def test_dockerignore_keeps_secrets_out_of_the_image():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "**", "start from 'ignore everything', then allow the sources"
    assert not any(".env" in rule or ".git" in rule for rule in rules if rule.startswith("!"))


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_objects_are_all_there():
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in k8s_documents()}
    for expected in [
        ("ray.io/v1", "RayCluster"),
        ("ray.io/v1", "RayJob"),
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("v1", "Service"),
        ("v1", "PersistentVolumeClaim"),
        ("v1", "Secret"),
    ]:
        assert expected in kinds, f"missing {expected}"
    secrets = [p for p, d in k8s_documents() if d["kind"] == "Secret"]
    assert {p.name for p in secrets} == {"secrets.example.yaml"}


def test_ray_clusters_have_token_auth_and_the_sweep_environment():
    ray_objects = of_kind("RayCluster") + of_kind("RayJob")
    for doc in ray_objects:
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["authOptions"] == {"mode": "token"}, doc["metadata"]["name"]
        assert spec["rayVersion"] == RAY_VERSION
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
        for container in containers(doc):
            image = container["image"]
            assert re.fullmatch(rf"\S+/landscape-sweeps:{PACKAGE_VERSION}-(cpu|cu\d+)", image), image
            env = env_of(container)
            assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
            assert env["SWEEPS_STORAGE"]["value"].startswith(PG_URL)
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"} <= set(env)
            limits = container.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert image.endswith(tuple(f"-cu{n}" for n in range(100, 200))), image


def test_rayjob_runs_a_sweep_from_a_mounted_config():
    (job,) = of_kind("RayJob")
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["sweeps", "run"] and "--name" in entry
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    config_volume = next(v for v in head["volumes"] if "configMap" in v)
    assert entry[2].startswith(mounts[config_volume["name"]] + "/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_mlflow_server_deployment():
    (deployment,) = of_kind("Deployment")
    (container,) = containers(deployment)
    assert_mlflow_server(
        container["command"] + container["args"],
        ["mlflow:5000", "mlflow.sweeps.svc.cluster.local:5000", "localhost:5000"],
    )
    env = env_of(container)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    destination = flags(container["args"])["artifacts-destination"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert destination.startswith("s3://") or destination in mounts
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "mlflow"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["port"] == 5000
    assert port_names[service["spec"]["ports"][0]["targetPort"]] == 5000
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # RWO artifact volume


def test_postgres_statefulset():
    (statefulset,) = of_kind("StatefulSet")
    (container,) = containers(statefulset)
    assert container["image"].startswith("postgres:")
    env = env_of(container)
    for name in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]
    claims = statefulset["spec"]["volumeClaimTemplates"]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == claims[0]["metadata"]["name"])
    assert env["PGDATA"]["value"].startswith(data_mount["mountPath"] + "/")
    assert any(m["mountPath"] == "/docker-entrypoint-initdb.d" for m in container["volumeMounts"])
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "postgres"]
    assert service["spec"]["ports"][0]["port"] == 5432
    assert statefulset["spec"]["serviceName"] == "postgres"


def test_kubernetes_secrets_only_by_reference_and_all_defined():
    defined = secrets_in_example()
    for path, doc in k8s_documents():
        if doc["kind"] == "Secret":
            assert all(v.startswith("REPLACE_ME") for v in doc["stringData"].values()), path
            continue
        for container in containers(doc) if doc["kind"] not in {"Service", "PersistentVolumeClaim"} else []:
            for name, entry in env_of(container).items():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_NAME.search(name):
                    assert ref and "value" not in entry, f"{path.name}: {name} must use secretKeyRef"
                if ref:
                    assert ref["key"] in defined.get(ref["name"], ()), (
                        f"{path.name}: {name} refers to {ref}, not in secrets.example.yaml"
                    )
    for path in [*K8S.glob("*.yaml"), DEPLOY / "docker-compose.yaml", DEPLOY / "mlflow" / "basic_auth.ini"]:
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), f"{path}: password in a URL"
        assert "postgresql://" not in text.replace(PG_URL, ""), f"{path}: database URLs must start with {PG_URL}"


def test_mlflow_auth_config_holds_no_secret():
    parser = configparser.ConfigParser()
    parser.read(DEPLOY / "mlflow" / "basic_auth.ini")
    section = parser["mlflow"]
    assert "admin_password" not in section
    assert section["database_uri"].startswith(PG_URL)
    assert section["default_permission"] in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_renders_offline():
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert any(n.startswith("postgres-init-") for n in generated)
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    init_volume = pod_specs(statefulset)[0]["volumes"][0]["configMap"]["name"]
    assert init_volume in generated, "kustomize must rewrite the generated ConfigMap name"


def test_postgres_init_script_is_valid_bash():
    script = DEPLOY / "postgres" / "init-databases.sh"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    for database in ("mlflow", "mlflow_auth", "optuna"):
        assert f"CREATE DATABASE {database} " in text


# --------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_compose_services_and_commands(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "mlflow", "ray-head", "ray-worker"}
    assert_mlflow_server(services["mlflow"]["command"], ["mlflow:5000", "127.0.0.1:5000"])
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    worker = services["ray-worker"]["command"]
    port = flags(head[2:])["port"]
    assert f"--address=ray-head:{port}" in worker and "--block" in worker
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["SWEEPS_STORAGE"].startswith(f"{PG_URL}optuna@postgres:5432/")
    init = services["postgres"]["volumes"][1].split(":")[0]
    assert (DEPLOY / init).is_file()
    for service in services.values():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), f"{published}: publish on loopback only"


def test_compose_secrets_come_from_dotenv(compose):
    example = env_example()
    text = yaml.safe_dump(compose)  # values only, not comments
    for name in re.findall(r"\$\{(\w+)", text):
        assert name in example, f"${{{name}}} is not documented in deploy/.env.example"
    for service_name, service in compose["services"].items():
        for name, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(name):
                match = ENV_REFERENCE.match(str(value))
                assert match, f"{service_name}: {name} must come from .env, not a literal"
    assert all(re.fullmatch(r"replace-me[\w-]*", v) for k, v in example.items() if SECRET_NAME.search(k))
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / ".env")], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0, "deploy/.env must be git-ignored"


def test_deploy_guide_covers_the_launcher_commands():
    text = (ROOT / "docs" / "guide" / "scaling-out.md").read_text()
    for command in ("ray up", "ray submit", "ray attach", "sweeps submit", "kubectl apply -k deploy/"):
        assert command in text, command
