"""The cluster configs (ray_cluster.yaml, cluster/) checked with Ray's own validators, offline.

No cluster starts and nothing is downloaded: the cluster launcher config is validated against the
JSON schema inside the ray wheel and by `ray up`'s own validation; the Serve configs by Ray Serve's
pydantic schema; the runtime envs by `ray.runtime_env.RuntimeEnv`; the working-dir exclusions by
running Ray's own packaging code on a scratch tree and listing the zip it would upload.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
from pathlib import Path
from zipfile import ZipFile

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]

# Entry points that the issue-3 and issue-4 branches provide (jobs/*.py, tina/serve.py). Their
# files may not be merged where this test first runs, so the configs' module names are checked
# against this list, and the flags against the jobs' shared command line.
JOB_MODULES = {"jobs.pipeline", "jobs.build_zoo", "jobs.train_dit", "jobs.tune_dit"}
JOB_FLAGS = {"--config", "--out", "--address", "--num-workers", "--use-gpu", "--cpus-per-worker",
             "--storage-path"}
SERVE_IMPORT_PATH = "tina.serve:build_app"
SERVE_DEPLOYMENTS = {"Ingress", "Generator"}
# What no working-dir upload may carry: the local venv, run outputs, datasets, benchmark results.
NEVER_UPLOADED = [".venv/bin/python", "runs/demo/report.json", "data/mnist/mnist.pkl.gz",
                  "bench/results/ray_scaling.json", ".git/HEAD",
                  "tina/__pycache__/zoo.cpython-311.pyc", "tina.egg-info/PKG-INFO"]
# What a job needs from the checkout; tests/data/ proves the exclusions are anchored at the root.
UPLOADED = ["tina/zoo.py", "tina/data.py", "jobs/pipeline.py", "configs/demo.yaml",
            "scripts/fetch_data.sh", "bench/ray_scaling.py", "tests/data/sample.txt",
            "requirements.lock", "pyproject.toml"]


def _yaml(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _validate_launcher_config(config: dict) -> None:
    """The JSON schema shipped in the ray wheel, then `ray up`'s own checks (defaults filled in,
    head_node_type among the node types, ...). Raises jsonschema.ValidationError or ValueError."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def _validate_serve_config(config: dict) -> ServeDeploySchema:
    """Ray Serve's ServeDeploySchema (what `serve deploy` and KubeRay apply), plus what it lets
    through silently: unknown keys in applications, deployments and autoscaling configs (such as
    the removed `max_concurrent_queries`), and autoscaling bounds (Ray's AutoscalingConfig).
    Raises pydantic.ValidationError or ValueError."""
    schema = ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        unknown = set(app) - set(ServeApplicationSchema.model_fields)
        for dep in app.get("deployments", []):
            unknown |= set(dep) - set(DeploymentSchema.model_fields)
            if "autoscaling_config" in dep:
                unknown |= set(dep["autoscaling_config"]) - set(AutoscalingConfig.model_fields)
                AutoscalingConfig(**dep["autoscaling_config"])
        if unknown:
            raise ValueError(f"keys Ray Serve does not know: {sorted(unknown)}")
    return schema


def _uploaded_files(workdir: Path, runtime_env: dict, scratch: Path) -> set[str]:
    """The files Ray would upload for `workdir` as a working_dir: Ray's own upload path
    (excludes from the runtime env, .rayignore, Ray's default excludes) up to the zip it sends,
    with the send itself replaced by listing that zip. .gitignore is off here
    (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 on a user's machine does the same)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    calls = []
    upload_working_dir_if_needed(
        dict(runtime_env, working_dir=str(workdir)), include_gitignore=False,
        upload_fn=lambda path, excludes, is_file=False: calls.append((path, excludes)))
    ((path, excludes),) = calls
    package = scratch / "package.zip"
    create_package(path, package, include_gitignore=False, excludes=excludes)
    return set(ZipFile(package).namelist())


def _entrypoint(command: str) -> tuple[str, list[str]]:
    """(module, flags) of a `python -m MODULE --flag value ...` command."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    return argv[2], argv[3:]


def _check_job_command(command: str) -> None:
    module, args = _entrypoint(command)
    assert module in JOB_MODULES, f"{module} is not one of the project's jobs"
    flags = [a for a in args if a.startswith("--")]
    assert set(flags) <= JOB_FLAGS, set(flags) - JOB_FLAGS
    config = args[args.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{config} does not exist in the repository"
    assert "--out" in flags


# --- ray_cluster.yaml (cluster launcher) -------------------------------------------------------

def test_ray_cluster_yaml_passes_the_schema_in_the_ray_wheel_and_ray_up_validation():
    _validate_launcher_config(_yaml("ray_cluster.yaml"))


def test_ray_cluster_yaml_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = _yaml("ray_cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 2
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    (gpu,) = workers
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["docker"]["head_image"].endswith("-cpu")
    assert config["docker"]["worker_image"].endswith("-gpu")
    for image in (config["docker"]["head_image"], config["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


def test_ray_cluster_yaml_installs_the_project_and_prepares_the_data_on_every_node():
    config = _yaml("ray_cluster.yaml")
    assert config["file_mounts"]["~/tina"] == "."
    for path in (".venv", "runs", "data", "bench/results"):
        assert path in config["rsync_exclude"]
    # setup_commands run on every node (head and workers; no node type overrides them).
    setup = "\n".join(config["setup_commands"])
    assert "pip install -q -r ~/tina/requirements.lock" in setup
    assert "pip install -q --no-deps --no-build-isolation -e ~/tina" in setup
    assert "bash ~/tina/scripts/fetch_data.sh ~/tina-data" in setup
    assert not any("worker_setup_commands" in t for t in config["available_node_types"].values())
    for rel in ("requirements.lock", "pyproject.toml", "scripts/fetch_data.sh"):
        assert (ROOT / rel).is_file()
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "mlflow server" in head_start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c
               for c in config["worker_start_ray_commands"])


def test_ray_cluster_yaml_turns_on_token_authentication_on_every_node():
    config = _yaml("ray_cluster.yaml")
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert start.startswith("export RAY_AUTH_MODE=token;"), start


def _gpu_as_fraction(c: dict) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _misspelt_setup(c: dict) -> None:
    c["setup_command"] = c.pop("setup_commands")


def _no_node_config(c: dict) -> None:
    del c["available_node_types"]["gpu_worker"]["node_config"]


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "cpu_head"


def _commands_as_string(c: dict) -> None:
    c["setup_commands"] = "pip install -e ~/tina"


@pytest.mark.parametrize("breakage", [_gpu_as_fraction, _misspelt_setup, _no_node_config,
                                      _unknown_head_type, _commands_as_string])
def test_a_broken_copy_of_ray_cluster_yaml_fails_validation(breakage):
    config = _yaml("ray_cluster.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher_config(config)


# --- Serve: cluster/serve_config.yaml and the RayService ---------------------------------------

def test_serve_config_is_a_valid_serve_deploy_config_for_tina_serve():
    schema = _validate_serve_config(_yaml("cluster/serve_config.yaml"))
    (app,) = schema.applications
    assert app.import_path == SERVE_IMPORT_PATH
    assert set(app.args) == {"checkpoint"}
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == SERVE_DEPLOYMENTS
    for dep in deployments.values():
        scaling = AutoscalingConfig(**dep.autoscaling_config)
        assert 1 <= scaling.min_replicas < scaling.max_replicas
        assert dep.max_ongoing_requests >= scaling.target_ongoing_requests
        assert 0 < dep.ray_actor_options.num_cpus <= 1
    assert deployments["Ingress"].ray_actor_options.num_cpus < 1
    assert 0 < deployments["Generator"].ray_actor_options.num_gpus <= 1
    assert schema.http_options.port == 8000


@pytest.mark.parametrize("breakage", [
    lambda d: d.update(max_concurrent_queries=5),  # the removed name (ENV.md)
    lambda d: d["autoscaling_config"].update(min_replicas=20),  # above max_replicas
    lambda d: d["ray_actor_options"].update(num_gpus=-1),
])
def test_a_broken_serve_config_fails_validation(breakage):
    config = _yaml("cluster/serve_config.yaml")
    breakage(config["applications"][0]["deployments"][1])
    with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
        _validate_serve_config(config)


def test_the_served_checkpoint_is_the_one_the_rayjob_pipeline_writes():
    _, args = _entrypoint(_yaml("cluster/rayjob.yaml")["spec"]["entrypoint"])
    out = args[args.index("--out") + 1]
    (app,) = _yaml("cluster/serve_config.yaml")["applications"]
    assert app["args"]["checkpoint"] == f"{out}/generator"


def test_rayservice_serves_the_same_application_as_serve_config():
    manifest = _yaml("cluster/rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    _validate_serve_config(embedded)
    standalone = _yaml("cluster/serve_config.yaml")
    # The same application; only the RayService adds a runtime_env that brings the code.
    runtime_env = embedded["applications"][0].pop("runtime_env")
    assert embedded == standalone
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"].endswith(".zip")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


# --- RayJob and the runtime env --------------------------------------------------------------

def test_rayjob_runs_the_pipeline_job_on_a_cpu_head_and_autoscaling_gpu_workers():
    manifest = _yaml("cluster/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    module, _ = _entrypoint(spec["entrypoint"])
    assert module == "jobs.pipeline"
    _check_job_command(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert {"TINA_DATA_DIR", "MLFLOW_TRACKING_URI"} <= set(runtime_env["env_vars"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_a_job_command_with_an_unknown_module_or_flag_is_rejected():
    with pytest.raises(AssertionError):
        _check_job_command("python -m jobs.pipelines --config configs/demo.yaml --out x")
    with pytest.raises(AssertionError):
        _check_job_command("python -m jobs.pipeline --config configs/demo.yaml --out x --gpus 1")
    with pytest.raises(AssertionError):
        _check_job_command("python -m jobs.pipeline --config configs/nope.yaml --out x")


def test_runtime_env_yaml_is_a_valid_ray_runtime_env_with_the_cluster_settings():
    runtime_env = _yaml("cluster/runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"] == "."
    assert {"TINA_DATA_DIR", "MLFLOW_TRACKING_URI"} <= set(runtime_env["env_vars"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    # Where ray_cluster.yaml's setup prepares the data (~ is /home/ray in the rayproject images).
    assert runtime_env["env_vars"]["TINA_DATA_DIR"] == "/home/ray/tina-data"
    setup = _yaml("ray_cluster.yaml")["setup_commands"]
    assert "bash ~/tina/scripts/fetch_data.sh ~/tina-data" in setup
    with pytest.raises(TypeError):  # RuntimeEnv checks field types: a broken copy fails
        RuntimeEnv(**dict(runtime_env, excludes="/.venv"))


def _scratch_checkout(root: Path) -> Path:
    for rel in UPLOADED + NEVER_UPLOADED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


@pytest.mark.parametrize("source", ["runtime_env excludes", ".rayignore"])
def test_working_dir_upload_leaves_out_venv_runs_data_and_results(source, tmp_path, monkeypatch):
    # Ray's built-in default excludes (.git, .venv, ...) are switched off, so each of our two
    # exclusion lists has to do the whole job by itself.
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    workdir = _scratch_checkout(tmp_path / "checkout")
    runtime_env = _yaml("cluster/runtime_env.yaml")
    if source == ".rayignore":
        shutil.copy(ROOT / ".rayignore", workdir / ".rayignore")
        del runtime_env["excludes"]
    uploaded = _uploaded_files(workdir, runtime_env, tmp_path)
    assert set(UPLOADED) <= uploaded
    assert not uploaded & set(NEVER_UPLOADED), uploaded & set(NEVER_UPLOADED)


def test_without_exclusions_the_upload_would_carry_them(tmp_path, monkeypatch):
    # The check above can fail: the same tree with no excludes uploads everything.
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    workdir = _scratch_checkout(tmp_path / "checkout")
    uploaded = _uploaded_files(workdir, {}, tmp_path)
    assert set(NEVER_UPLOADED) <= uploaded
