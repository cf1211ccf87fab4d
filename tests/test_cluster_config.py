"""The cluster configs pass Ray's own schema check, offline, and keep their promises.

``cluster.yaml`` (AWS, GPU workers) and ``sweeps/cluster-local.yaml`` (one machine, the
local provider) go through what ``ray up`` does to a config before it touches a cloud:
``prepare_config`` (defaults merged, node types filled) then ``validate_config`` (the
JSON schema in ``ray/autoscaler/ray-schema.json``). Both are private Ray APIs; the first
test pins them so that a Ray upgrade that moves them fails here, loudly, instead of the
other tests silently checking less.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "cluster.yaml"
LOCAL = REPO / "sweeps" / "cluster-local.yaml"
CONFIGS = [CLOUD, LOCAL]


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip().startswith(f"{package}=="):
            return line.split("==", 1)[1].split("#")[0].strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(path))
    validate_config(config)
    return config


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k) or []]


# --------------------------------------------------------------- Ray's own check


def test_ray_private_config_api_is_where_we_expect():
    """Pin the private API the schema tests rely on (and the Ray they were written for)."""
    import ray
    from ray.autoscaler._private import util

    assert ray.__version__ == pinned("ray"), "the installed Ray is not the pinned one"
    assert list(inspect.signature(util.prepare_config).parameters) == ["config"]
    assert list(inspect.signature(util.validate_config).parameters) == ["config"]
    schema = Path(util.__file__).resolve().parents[1] / "ray-schema.json"
    assert schema.is_file(), schema
    # validate_config really rejects: an unknown top-level key fails the schema.
    import jsonschema

    bad = util.prepare_config({**load(LOCAL), "not_a_ray_key": 1})
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_schema_valid_offline(path):
    config = prepared(path)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["head_start_ray_commands"] and config["file_mounts"]


# ------------------------------------------------------------------ the GPU cluster


def test_cloud_provider_and_autoscaling_gpu_workers():
    config = prepared(CLOUD)
    assert config["provider"]["type"] in {"aws", "gcp", "azure"}
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers, "no worker node types"
    assert head["resources"].get("CPU") == 0, "trials must not land on the CPU head"
    assert not head["resources"].get("GPU")
    gpu_types = {k: v for k, v in workers.items()
                 if re.match(r"(g[4-6]|p[3-5]|g5g)", v["node_config"]["InstanceType"])}
    assert gpu_types, "no GPU worker type"
    for name, node in gpu_types.items():
        assert node["min_workers"] == 0, f"{name} must scale from zero"
        assert node["max_workers"] >= 1, name
    assert config["max_workers"] >= max(n["max_workers"] for n in gpu_types.values())
    assert config["idle_timeout_minutes"] > 0


def test_image_ray_matches_pin():
    config = load(CLOUD)
    docker = config["docker"]
    images = {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert images
    for image in images:
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray", image
        assert tag.split("-")[0] == pinned("ray"), f"{image}: Ray differs from constraints.txt"
    worker_image = docker.get("worker_image", docker["image"])
    assert worker_image.endswith("-gpu") or "-cu" in worker_image, "workers need a GPU image"
    py = re.search(r"-py3(\d+)", worker_image)
    assert py, "pin the image's Python"


def test_project_mounted_and_installed_with_pins():
    for path in CONFIGS:
        config = load(path)
        assert config["file_mounts"].get("~/kd") == ".", path
        assert ".gitignore" in config.get("rsync_filter", []), f"{path}: would copy .venv/"
        setup = " ".join(config["setup_commands"])
        assert "pip install" in setup and "-c" in setup and "constraints.txt" in setup, path
        assert "-e ~/kd" in setup or ("cd ~/kd" in setup and "-e ." in setup), path
        # `ray up` fails when the node's Ray is not the pinned one.
        assert "ray==" in setup and "ray.__version__" in setup, path


def test_start_commands():
    for path in CONFIGS:
        config = load(path)
        head = " ".join(config["head_start_ray_commands"])
        assert "ray start --head" in head and "--autoscaling-config=" in head, path
        assert "ray start --address=$RAY_HEAD_IP:" in " ".join(config["worker_start_ray_commands"])
        client = re.search(r"--ray-client-server-port=(\d+)", head)
        if client:  # must not sit in Ray's worker port range
            assert not 10002 <= int(client.group(1)) <= 19999, path
        gcs = re.search(r"--port=(\d+)", head).group(1)
        assert f"$RAY_HEAD_IP:{gcs}" in " ".join(config["worker_start_ray_commands"]), path
    for command in all_commands(load(CLOUD)) + all_commands(load(LOCAL)):
        assert "--stop" not in command and "shutdown" not in command


def test_shared_storage_for_tune_results():
    config = load(CLOUD)
    run_options = " ".join(config["docker"]["run_options"])
    mount = re.search(r"--volume (/mnt/\w+):(/mnt/\w+)", run_options)
    assert mount, "the shared file system is not mounted into the container"
    shared = mount.group(2)
    assert any(shared in c and "mount" in c for c in config["initialization_commands"])
    assert f"KD_CACHE_DIR={shared}/" in run_options
    # The documented launch command keeps Tune's results on the shared file system.
    header = CLOUD.read_text().split("\ncluster_name:")[0]
    assert re.search(rf"--output-dir {shared}/", header), "document --output-dir on shared storage"


def test_mlflow_uri_from_env_without_credentials():
    config = load(CLOUD)
    envs = dict(re.findall(r"--env (\w+)=(\S+)", " ".join(config["docker"]["run_options"])))
    uri = envs.get("MLFLOW_TRACKING_URI")
    assert uri, "MLFLOW_TRACKING_URI must reach the nodes as an environment variable"
    assert re.match(r"https?://[^/@\s]+(:\d+)?/?$", uri), f"{uri}: a server URI, no userinfo"
    assert envs.get("RAY_ADDRESS") == "auto"
    # The local config leaves MLflow to the sweep's default store (or the user's env).
    assert "MLFLOW_TRACKING_URI" not in " ".join(all_commands(load(LOCAL)))


SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                        # AWS access key id
    r"(?i)aws_secret_access_key",
    r"(?i)aws_session_token",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)(password|passwd|secret|token)\s*[=:]\s*['\"]?[A-Za-z0-9/+_-]{8,}",
    r"://[^/\s:@]+:[^/\s@]+@",                  # credentials in a URI
    r"ghp_[A-Za-z0-9]{20,}", r"xox[bp]-",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_secrets_inline(path):
    text = path.read_text()
    live = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, live), f"{path.name}: matches {pattern}"
    auth = load(path).get("auth") or {}
    for key in ("ssh_private_key", "ssh_public_key"):
        if key in auth:  # a path to a key file, never the key itself
            assert "\n" not in auth[key] and "PRIVATE" not in auth[key]
            assert auth[key].startswith(("~/", "/")), auth[key]
    if path == CLOUD:
        assert "ssh_private_key" not in auth, "let `ray up` create the key pair"


def test_local_config_is_one_machine_over_ssh():
    config = load(LOCAL)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert "docker" not in config
    prepared_local = prepared(LOCAL)
    (node_type,) = prepared_local["available_node_types"].values()
    assert node_type["max_workers"] == 0
    head = " ".join(config["head_start_ray_commands"])
    # Not Ray's default ports, so it can sit next to a `python sweeps/X.py` local Ray.
    for flag, default in (("--port", 6379), ("--dashboard-port", 8265),
                          ("--ray-client-server-port", 10001),
                          ("--dashboard-agent-listen-port", 52365)):
        m = re.search(rf"{flag}=(\d+)", head)
        assert m and int(m.group(1)) != default, flag


def test_local_config_renders_for_the_e2e(tmp_path):
    """The e2e harness's rendering keeps the config valid and changes only what it says."""
    from cluster_harness import PORT_FLAGS, render_local_config

    ports = {flag: 30000 + i for i, flag in enumerate(PORT_FLAGS)}
    dest = tmp_path / "c.yaml"
    render_local_config(LOCAL, dest, cluster_name="t", ssh_user="someone",
                        ssh_private_key=tmp_path / "k", ssh_port=2222,
                        project_dir=REPO, ports=ports)
    out = prepared(dest)
    assert out["auth"]["ssh_proxy_command"] == "nc 127.0.0.1 2222"
    assert out["file_mounts"]["~/kd"] == str(REPO)
    head = " ".join(out["head_start_ray_commands"])
    for flag, port in ports.items():
        assert f"{flag}={port} " in head + " "
    src, new = load(LOCAL), load(dest)
    for key in ("setup_commands", "worker_start_ray_commands", "provider", "rsync_filter"):
        assert src[key] == new[key], key


def test_dashboard_stays_on_the_head_and_secrets_stay_out_of_dotfiles():
    """No Ray port opened to a network; the header says how to reach the dashboard (an ssh
    tunnel, as ``ray dashboard`` makes); not even a commented example writes a secret into a
    shell startup file, where every login (and ``ray exec``) would source it."""
    text = CLOUD.read_text()
    for path in CONFIGS:
        for command in all_commands(load(path)):
            assert "0.0.0.0" not in command, f"{path.name}: {command}"
    head = " ".join(load(CLOUD)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    header = text.split("\ncluster_name:")[0]
    assert "ray dashboard cluster.yaml" in header
    assert re.search(r"ssh .*-L 8265:127\.0\.0\.1:8265", header), "document the ssh tunnel by hand too"
    for line in text.splitlines():  # comments included: users copy examples
        if re.search(r"(?i)password|secret|token", line):
            assert not re.search(r">>?\s*~?/?\S*(\.bashrc|\.profile|\.bash_profile|\.zshrc|\.env)\b", line), line
    assert not re.search(r">>?\s*~/\.", text), "nothing is appended to a dotfile, not even in an example"
