"""What `cluster/` promises, checked without a cloud account or a Kubernetes cluster.

The launcher YAMLs go through Ray's own config preparation and schema
(`ray/autoscaler/ray-schema.json`, the check `ray up` runs first). The KubeRay manifests go
through `cluster/schemas/kuberay-v1-minimal.json`, a hand-written schema that follows the
KubeRay CRD (its description says which commit). The job upload is packaged with Ray's own
`create_package`, the function `ray job submit --working-dir` calls. Nothing here launches
a cluster.
"""

import re
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY_YAMLS = ["raycluster.yaml", "rayjob.yaml", "shared-storage.yaml"]
SHARED_MOUNT = "/mnt/shared"
RAY_UPLOAD_LIMIT = 100 * 1024 * 1024  # the limit this project keeps to (Ray's own is larger)
NEVER_UPLOADED = (".venv/", ".venv-", ".git/", ".cache/", "runs/", ".whl/", ".pytest_cache/")


def load_launcher(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def load_kuberay():
    """Every document under cluster/kuberay/, keyed by kind."""
    docs = {}
    for name in KUBERAY_YAMLS:
        for doc in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()):
            docs[doc["kind"]] = doc
    return docs


def ray_cluster_specs():
    docs = load_kuberay()
    return {"RayCluster": docs["RayCluster"]["spec"], "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"]}


def pod_templates(spec):
    yield spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]


def paper_config():
    return yaml.safe_load((ROOT / "configs" / "paper-8b.yaml").read_text())


def pinned_ray_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    return ray_dep.split("==")[1]


def readme_cluster_section():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Run on a cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Run on a cluster' section"
    return match.group(1)


def every_mapping(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from every_mapping(value)
    elif isinstance(node, list):
        for item in node:
            yield from every_mapping(item)


# Cluster launcher ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_own_config_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_launcher(name)))  # raises on any schema error


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_gpu_workers_hold_the_paper_train_job_on_one_node(name):
    train = paper_config()["train"]
    needed = train["workers"] * train["gpus_per_worker"]
    nodes = load_launcher(name)["available_node_types"]
    gpu_nodes = [n for n in nodes.values() if n.get("resources", {}).get("GPU", 0) >= needed]
    assert gpu_nodes, f"{name}: no node type with {needed} GPUs for configs/paper-8b.yaml"
    assert all(n["min_workers"] == 0 for n in gpu_nodes), "GPU workers should scale from zero"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_starts_every_node_with_token_auth(name):
    config = load_launcher(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{name}: {key}"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_dashboard_listens_on_localhost_only(name):
    (head_start,) = [c for c in load_launcher(name)["head_start_ray_commands"] if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start


def test_aws_security_group_opens_ssh_and_nothing_else():
    rules = load_launcher("aws-gpu.yaml")["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_mounts_shared_storage_where_the_paper_run_dir_lives(name):
    config = load_launcher(name)
    assert paper_config()["run_dir"].startswith(SHARED_MOUNT + "/")
    assert any(SHARED_MOUNT in c and "mount" in c for c in config["initialization_commands"])
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in " ".join(config["docker"]["run_options"])


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_installs_the_gpu_extra_on_the_pinned_ray_image(name):
    config = load_launcher(name)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray_version()}-")
    assert any('pip install' in c and '".[gpu]"' in c for c in config["setup_commands"])


# KubeRay --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "PersistentVolumeClaim"])
def test_kuberay_manifest_matches_the_schema(kind):
    schema = yaml.safe_load((CLUSTER / "schemas" / "kuberay-v1-minimal.json").read_text())
    validator = jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{kind}"})
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(load_kuberay()[kind])
    ]
    assert not errors, errors


def test_kuberay_schema_rejects_a_misspelt_field():
    schema = yaml.safe_load((CLUSTER / "schemas" / "kuberay-v1-minimal.json").read_text())
    cluster = load_kuberay()["RayCluster"]
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(cluster, {**schema, "$ref": "#/definitions/RayCluster"})


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_uses_token_auth_and_an_internal_head_service(kind):
    spec = ray_cluster_specs()[kind]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert spec["rayVersion"] == pinned_ray_version()


def test_rayjob_creates_the_same_cluster_as_raycluster_yaml():
    specs = ray_cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_rayjob_runs_the_paper_config_through_the_driver():
    spec = load_kuberay()["RayJob"]["spec"]
    assert "python -m pipelines.driver --config configs/paper-8b.yaml" in spec["entrypoint"]


def test_every_ray_pod_mounts_the_shared_claim_at_the_run_dir_root():
    docs = load_kuberay()
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for template in pod_templates(docs["RayCluster"]["spec"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            undeclared = set(mounts.values()) - set(volumes)
            assert not undeclared, f"{container['name']} mounts undeclared volumes {undeclared}"
            shared = volumes[mounts[SHARED_MOUNT]]
            assert shared["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_gpu_worker_group_holds_the_paper_train_job_on_one_pod():
    train = paper_config()["train"]
    (worker,) = load_kuberay()["RayCluster"]["spec"]["workerGroupSpecs"]
    (container,) = worker["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= train["workers"] * train["gpus_per_worker"]


def test_dockerfile_builds_the_gpu_extra_on_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pinned_ray_version())}-\S*gpu$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text
    # Every package pyproject installs is in the image (serve's chat log imports sim).
    import tomllib
    packages = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = set(re.findall(r"^COPY \S+ (\w+) \1$", text, re.M))
    assert {name.rstrip("*") for name in packages["include"]} <= copied


# Secure by default, everywhere under cluster/ -------------------------------------------------


def cluster_files():
    return [p for p in CLUSTER.rglob("*") if p.is_file()]


def test_nothing_under_cluster_disables_token_auth():
    for path in cluster_files():
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W{1,3}disabled", text), path
        if path.suffix == ".yaml":
            for mapping in every_mapping(list(yaml.safe_load_all(text))):
                if mapping.get("name") == "RAY_AUTH_MODE":
                    assert mapping.get("value") != "disabled", path
                assert mapping.get("authOptions", {}).get("mode") != "disabled", path


def test_nothing_under_cluster_opens_a_load_balancer():
    for path in cluster_files():
        assert not re.search(r"(type|serviceType)\W{1,3}LoadBalancer", path.read_text()), path


# The job upload -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "honour_gitignore", [True, False], ids=["default", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"]
)
def test_working_dir_upload_is_small_and_leaves_local_state_behind(tmp_path, honour_gitignore):
    """Package the repository exactly as `ray job submit --working-dir .` does."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    excludes = get_runtime_env_default_excludes() if honour_gitignore else []
    create_package(str(ROOT), package, include_gitignore=honour_gitignore, excludes=excludes)

    assert package.stat().st_size < RAY_UPLOAD_LIMIT
    names = zipfile.ZipFile(package).namelist()
    assert "pipelines/driver.py" in names and "configs/paper-8b.yaml" in names
    leaked = [n for n in names if n.startswith(NEVER_UPLOADED) or "__pycache__" in n or ".egg-info" in n]
    assert not leaked, leaked[:10]


# README ---------------------------------------------------------------------------------------


def test_readme_names_only_cluster_files_that_exist():
    paths = set(re.findall(r"cluster/[\w./-]*[\w]", readme_cluster_section()))
    assert paths, "the README section names no cluster/ file"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_readme_job_submit_runs_the_paper_config_through_the_driver():
    section = readme_cluster_section().replace("\\\n", " ")
    (submit,) = [line for line in section.splitlines() if line.lstrip().startswith("ray job submit")]
    assert "--working-dir ." in submit
    assert "python -m pipelines.driver --config configs/paper-8b.yaml" in submit
