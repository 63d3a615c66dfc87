"""The recipes in ``deploy/``, run for real where this machine allows it.

- SLURM: a private single-node SLURM (``deploy/slurm/single_node_test.sh``; skipped where the Debian
  packages ``slurm-wlm munge`` are absent) runs ``deploy/slurm_cluster.py`` with a GPU job over TLS;
  without SLURM, the recipe's job script is run with bash against the recipe's own scheduler, and the
  example ``deploy/slurm/cluster.yaml`` gives the job script it describes. (``deepmr run``/``simulate``
  with ``cluster: {kind: slurm}`` on the real SLURM: ``tests/test_cluster.py``.)
- Kubernetes: the manifests validate against the Dask operator's CRD schema (strictly: no unknown
  fields), follow ``make_worker_spec``/``make_scheduler_spec``, and the pods' command lines (and the
  Helm chart's) run as a TLS scheduler and GPU worker on 127.0.0.1 with the Secrets' contents.
- Container: the Dockerfile's pins are the tested versions and agree with ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from distributed import Client, Security
from distributed.comm import connect
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, assert_close_fp32, free_port, reference_one_hot

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"registry.example.org/deepmr-dist:{VERSION}"
GPU_LIMIT = {"nvidia.com/gpu": "1"}
"""One GPU per worker; the operator's CRD types resource quantities as strings, so it is quoted."""
SECRETS = {
    "deepmr-s3": {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret"},
}
"""Stand-ins for the Secrets the manifests read (deepmr-tls is added from the test's certificate)."""
LOCAL = {"scheduler": ["--host", "127.0.0.1", "--idle-timeout", "120s"],
         "worker": ["--host", "127.0.0.1", "--death-timeout", "60s"]}
"""Appended to the pods' Dask commands here: pods listen on all interfaces, the tests only on
loopback, and a scheduler and worker left by a killed test run stop by themselves."""


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yaml(name: str) -> dict:
    return yaml.safe_load((KUBERNETES / name).read_text())


def _tls_security(tls: Mapping[str, str]) -> Security:
    return Security(tls_ca_file=tls["ca.pem"], tls_client_cert=tls["cert.pem"], tls_client_key=tls["key.pem"],
                    require_encryption=True)


def _brute_force_ism(seq: str, members: list[torch.nn.Module]) -> tuple[np.ndarray, np.ndarray]:
    """``ref`` (member, task) and ``mut`` (member, position, allele, task; NaN at the reference base): every
    mutant through the whole network, not the package's incremental ISM."""
    ref_x = reference_one_hot(seq)
    length = len(seq)
    mutants = np.repeat(ref_x[None, None], 4, axis=1).repeat(length, axis=0)  # position, allele, 4, length
    for p in range(length):
        mutants[p, :, :, p] = np.eye(4, dtype=np.float32)
    with torch.inference_mode():
        ref = np.stack([m(torch.from_numpy(ref_x[None]))[0].numpy() for m in members])
        mut = np.stack([m(torch.from_numpy(mutants.reshape(-1, 4, length))).numpy().reshape(length, 4, -1)
                        for m in members])
    mut[:, np.arange(length), ["ACGT".index(b) for b in seq], :] = np.nan
    return ref, mut


def _assert_ism_is_brute_force(store: Path, n_loci: int = 2) -> None:
    from deepmr_dist.models.examples import simulation_ensemble

    ism = xr.open_zarr(store, group="ism", consolidated=False)
    assert bool(ism["complete"].all())
    seqs = [line.strip() for line in EXAMPLE_FASTA.read_text().splitlines() if line and not line.startswith(">")]
    members = simulation_ensemble()
    for i in range(n_loci):
        ref, mut = _brute_force_ism(seqs[i], members)
        assert_close_fp32(ism["ref_pred"].isel(locus=i).values, ref, err_msg=f"ref_pred, locus {i}")
        assert_close_fp32(ism["mut_pred"].isel(locus=i).values, mut, err_msg=f"mut_pred, locus {i}")


# --- One multi-GPU node ---------------------------------------------------------------------------


def test_local_gpus__one_worker_per_gpu_pinned_and_declaring_gpu(tmp_path, spawn):
    bin_dir = tmp_path / "bin"  # a stand-in nvidia-smi listing two GPUs
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: GPU-a)'\necho 'GPU 1: H100 (UUID: GPU-b)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = spawn(["bash", str(DEPLOY / "local_gpus.sh"), str(port), "2"], env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the script's own line once both workers joined
        if line.startswith("local_gpus.sh:"):
            assert line.strip() == f"local_gpus.sh: 2 GPU worker(s) ready at tcp://127.0.0.1:{port}"
            break
    with Client(f"tcp://127.0.0.1:{port}", set_as_default=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted((w["name"], w["resources"].get("GPU"), w["nthreads"], w["host"]) for w in workers) == [
            ("gpu0", 1, 2, "127.0.0.1"), ("gpu1", 1, 2, "127.0.0.1")]
        pinned = client.run(lambda dask_worker: (dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert sorted(pinned.values()) == [("gpu0", "0"), ("gpu1", "1")]


# --- SLURM ----------------------------------------------------------------------------------------


def _recipe(*options: str, deepmr: list[str], cwd: Path, env: Mapping[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "slurm_cluster.py"), *options, "--", *deepmr],
                          cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)


def test_slurm_recipe__gpu_job_over_tls_predicts_the_brute_force_values(single_node_slurm, tls, tmp_path):
    store, logs = tmp_path / "run.zarr", tmp_path / "logs"
    result = _recipe(
        "--jobs", "1", "--gpus-per-job", "1", "--cores", "1", "--memory", "2GB", "--walltime", "00:10:00",
        "--interface", "lo", "--local-directory", str(tmp_path / "scratch"), "--log-directory", str(logs),
        "--prologue", "echo deepmr-prologue-ran", "--wait-timeout", "120",
        "--tls-ca-file", tls["ca.pem"], "--tls-cert", tls["cert.pem"], "--tls-key", tls["key.pem"],
        deepmr=["predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(store), "-q"],
        cwd=tmp_path, env=single_node_slurm, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^scheduler tls://127\.0\.0\.1:\d+", result.stderr, re.M), result.stderr
    assert "resources {'GPU': 1.0}" in result.stderr  # the --gres=gpu:1 job's worker
    assert "deepmr-prologue-ran" in "".join(p.read_text() for p in logs.glob("*.out"))
    _assert_ism_is_brute_force(store)


@pytest.mark.slow
def test_slurm_recipe__deepmr_run_of_the_quickstart_pipeline(single_node_slurm, tmp_path):
    store = tmp_path / "quickstart.zarr"
    result = _recipe(
        "--jobs", "1", "--cores", "2", "--memory", "4GB", "--walltime", "00:20:00", "--interface", "lo",
        "--log-directory", str(tmp_path / "logs"), "--wait-timeout", "120",
        deepmr=["run", str(REPO / "pipelines" / "quickstart.yaml"), "--store", str(store), "-q"],
        cwd=tmp_path, env=single_node_slurm, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    global_ce = xr.open_zarr(store, group="meta", consolidated=False)["global_ce"]
    assert global_ce.sizes["method"] == 3 and bool(np.isfinite(global_ce).all())


def test_slurm_job_script__run_with_bash_joins_as_one_gpu_worker(tmp_path, spawn):
    pytest.importorskip("dask_jobqueue")
    recipe = _load_module(DEPLOY / "slurm_cluster.py")
    args = recipe.parse_args([
        "--gpus-per-job", "1", "--cores", "2", "--memory", "2GB", "--interface", "lo",
        "--local-directory", str(tmp_path / "scratch"), "--prologue", "export DEEPMR_PROLOGUE=ran",
        "--print-job-script",
    ])
    with recipe.make_cluster(args) as cluster:
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=2" in script
        assert script.count("--nthreads") == 1 and "--resources GPU=1" in script
        (tmp_path / "job.sh").write_text(script)
        spawn(["bash", str(tmp_path / "job.sh")], cwd=tmp_path)
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            (worker,) = client.scheduler_info(n_workers=-1)["workers"].values()
            assert worker["resources"] == {"GPU": 1} and worker["nthreads"] == 2
            assert worker["host"] == "127.0.0.1"
            assert client.submit(lambda: os.environ.get("DEEPMR_PROLOGUE"), resources={"GPU": 1}).result(30) == "ran"
            (local,) = client.run(lambda dask_worker: dask_worker.local_directory).values()
            assert Path(local).is_relative_to(tmp_path / "scratch")


def test_slurm_cluster_config__the_example_file_gives_gpu_jobs_that_run_its_prologue_first():
    pytest.importorskip("dask_jobqueue")
    from deepmr_dist.cli import build_parser
    from deepmr_dist.cli.cluster_options import cluster_settings
    from deepmr_dist.cluster import make_slurm_cluster

    path = DEPLOY / "slurm" / "cluster.yaml"
    args = build_parser("run").parse_args(["run", "pipeline.yaml", "--cluster-config", str(path)])
    options = cluster_settings(args).connect_options()  # what `deepmr run ... --cluster-config FILE` connects with
    assert options["address"] == "slurm" and options["gpu"] is None and options["min_workers"] is None
    slurm = replace(options["slurm"], interface="lo")  # ib0 is not on this machine
    with make_slurm_cluster(slurm) as cluster:
        script = cluster.job_script().splitlines()
    for directive in ("--gres=gpu:1", "-p gpu", "-A mylab", "--cpus-per-task=4", "-t 12:00:00"):
        assert f"#SBATCH {directive}" in script, directive
    prologue = yaml.safe_load(path.read_text())["job_script_prologue"]
    (worker,) = [i for i, line in enumerate(script) if "distributed.cli.dask_worker" in line]
    assert [script.index(line) for line in prologue] == sorted(script.index(line) for line in prologue)
    assert all(script.index(line) < worker for line in prologue)
    command = script[worker].split()
    assert command[:3] == ["python", "-m", "distributed.cli.dask_worker"]
    assert command.count("--nthreads") == 1 and command[command.index("--nthreads") + 1] == "4"
    assert " --resources GPU=1" in script[worker] and " --local-directory $TMPDIR" in script[worker]


def test_slurm_recipe__refuses_incomplete_tls_and_a_second_cluster_option():
    pytest.importorskip("dask_jobqueue")
    recipe = _load_module(DEPLOY / "slurm_cluster.py")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--tls-ca-file", "ca.pem", "--", "predict"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--", "run", "p.yaml", "--cluster", "tcp://127.0.0.1:8786"])
    assert recipe.parse_args(["--", "run", "p.yaml"]).deepmr == ["run", "p.yaml"]


# --- Kubernetes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    """The DaskCluster CRD's OpenAPI v3 schema as shipped in the dask-kubernetes wheel (the operator's Helm chart)."""
    dask_kubernetes = pytest.importorskip("dask_kubernetes")
    path = (Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm"
            / "dask-kubernetes-operator" / "crds" / "daskcluster.yaml")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["group"] == "kubernetes.dask.org" and crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return {"version": version["name"], "schema": version["schema"]["openAPIV3Schema"]}


def _strict(schema):
    """The schema with ``additionalProperties: false`` on every object that lists its properties (kubectl's strict field validation)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: _strict(s) for name, s in v.items()} if k == "properties" else _strict(v))
           for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _validator(schema: dict):
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft4Validator(_strict(schema))


def _errors(schema: dict, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(schema).iter_errors(instance)]


def _pod_spec_schema(crd_schema: dict) -> dict:
    """The core PodSpec schema, as the CRD embeds it for the worker pods."""
    return crd_schema["schema"]["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]


def test_daskcluster__validates_strictly_against_the_operator_crd(crd_schema):
    doc = _yaml("daskcluster.yaml")
    assert doc["apiVersion"] == f"kubernetes.dask.org/{crd_schema['version']}" and doc["kind"] == "DaskCluster"
    spec_schema = crd_schema["schema"]["properties"]["spec"]
    assert _errors(spec_schema, doc["spec"]) == []
    typo = copy.deepcopy(doc["spec"])  # the check can fail: an unknown field and a wrong type
    typo["worker"]["spec"]["containers"][0]["resource"] = typo["worker"]["spec"]["containers"][0].pop("resources")
    typo["worker"]["replicas"] = "4"
    assert len(_errors(spec_schema, typo)) == 2


def test_run_job_and_helm_values__pod_fields_validate_against_the_podspec_schema(crd_schema):
    pod = _pod_spec_schema(crd_schema)
    container = pod["properties"]["containers"]["items"]["properties"]
    job = _yaml("deepmr-run-job.yaml")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert _errors(pod, job["spec"]["template"]["spec"]) == []
    values = _yaml("helm-values.yaml")
    for role in ("scheduler", "worker"):
        assert _errors(container["env"], values[role]["env"]) == [], role
        assert _errors(container["resources"], values[role]["resources"]) == [], role
    assert _errors(pod["properties"]["volumes"], values["worker"]["mounts"]["volumes"]) == []
    assert _errors(container["volumeMounts"], values["worker"]["mounts"]["volumeMounts"]) == []
    assert _errors(pod["properties"]["tolerations"], values["worker"]["tolerations"]) == []


def test_daskcluster__gpu_worker_group_and_scheduler_follow_the_operator_specs():
    operator = pytest.importorskip("dask_kubernetes.operator")
    doc = _yaml("daskcluster.yaml")
    name = doc["metadata"]["name"]
    worker = doc["spec"]["worker"]
    (container,) = worker["spec"]["containers"]
    built = operator.make_worker_spec(image=IMAGE, n_workers=4, resources={"limits": GPU_LIMIT},
                                      worker_command="dask worker")
    (built_container,) = built["spec"]["containers"]
    assert worker["replicas"] == built["replicas"]
    assert (container["name"], container["image"]) == (built_container["name"], built_container["image"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == built_container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["ports"] == built_container["ports"]
    argv = container["command"] + container["args"]
    assert argv[:2] == built_container["args"][:2] == ["dask", "worker"]
    options = dict(zip(argv[3::2], argv[4::2]))  # after `dask worker ADDRESS`
    assert options["--name"] == "$(DASK_WORKER_NAME)" and options["--dashboard-address"] == "8788"
    assert options["--resources"] == "GPU=1" and argv.count("--resources") == 1 and argv.count("--nthreads") == 1
    assert int(options["--nthreads"]) == int(container["resources"]["limits"]["cpu"])
    env = {e["name"]: e for e in container["env"]}
    assert argv[2] == "$(DASK_SCHEDULER_ADDRESS)" and env["DASK_SCHEDULER_ADDRESS"]["value"] == f"tls://{name}-scheduler:8786"

    scheduler = operator.make_scheduler_spec(cluster_name=name, image=IMAGE)
    (ours,) = doc["spec"]["scheduler"]["spec"]["containers"]
    (theirs,) = scheduler["spec"]["containers"]
    assert doc["spec"]["scheduler"]["service"] == scheduler["service"]
    for field in ("name", "image", "ports", "readinessProbe", "livenessProbe"):
        assert ours[field] == theirs[field], field
    assert "nvidia.com/gpu" not in ours["resources"].get("limits", {})


def _dockerfile_stages() -> dict[str, dict]:
    """Each stage of deploy/Dockerfile: its base, ENTRYPOINT (JSON form) and COPY lines."""
    stages: dict[str, dict] = {}
    current = None
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            current = words[3] if len(words) > 3 else words[1]
            stages[current] = {"from": words[1], "entrypoint": None, "copy": [], "run": []}
        elif current and words[0] == "ENTRYPOINT":
            stages[current]["entrypoint"] = yaml.safe_load(line.split(None, 1)[1])
        elif current and words[0] in ("COPY", "RUN"):
            stages[current][words[0].lower()].append(line)
    stages["final"] = stages[current]
    return stages


def test_kubernetes_images_and_commands__agree_with_the_dockerfile_and_the_cli():
    from deepmr_dist.cli import build_parser

    stages = _dockerfile_stages()
    assert stages["final"]["entrypoint"] == ["deepmr"] and stages["cluster"]["entrypoint"] == []
    assert f"-t {IMAGE} " in (DEPLOY / "Dockerfile").read_text()
    assert f"--target cluster -t {IMAGE}-cluster " in (DEPLOY / "Dockerfile").read_text()
    cluster = _yaml("daskcluster.yaml")["spec"]
    for role in ("scheduler", "worker"):
        (container,) = cluster[role]["spec"]["containers"]
        assert container["image"] == IMAGE, role
        assert container["command"] == ["dask", role], role  # the image's entrypoint is deepmr
    (job,) = _yaml("deepmr-run-job.yaml")["spec"]["template"]["spec"]["containers"]
    assert job["image"] == IMAGE and "command" not in job
    parsed = build_parser(job["args"][0]).parse_args(job["args"])  # a valid deepmr command line
    worker_env = {e["name"]: e.get("value") for e in cluster["worker"]["spec"]["containers"][0]["env"]}
    assert parsed.cluster == worker_env["DASK_SCHEDULER_ADDRESS"]
    (wait,) = _yaml("deepmr-run-job.yaml")["spec"]["template"]["spec"]["initContainers"]
    assert wait["image"] == IMAGE and wait["command"][0] == "python"
    assert wait["args"] == [parsed.cluster, str(cluster["worker"]["replicas"])]
    values = _yaml("helm-values.yaml")
    for role in ("scheduler", "worker"):
        assert f"{values[role]['image']['repository']}:{values[role]['image']['tag']}" == f"{IMAGE}-cluster", role
    # the chart's templates run `dask-scheduler` and worker.image.dask_worker; distributed has neither
    assert values["worker"]["image"]["dask_worker"] == "dask-worker"
    assert any("deploy/bin/dask-scheduler deploy/bin/dask-worker" in c for c in stages["cluster"]["copy"])


def _pod_process(pod: dict, container: dict, secrets: Mapping[str, Mapping[str, str]], root: Path,
                 extra_env: Mapping[str, str] = {}, tokens: Mapping[str, str] = {}) -> tuple[list[str], dict[str, str]]:
    """The command line and environment a container of ``pod`` runs with, its volumes as directories under ``root``.

    Secret volumes hold the Secret's keys as files; other volumes are empty directories. Env values
    and ``secretKeyRef``s are resolved, ``$(VAR)`` is expanded as Kubernetes does, mount paths point
    into ``root``, and argv tokens (and env values) found in ``tokens`` are replaced.
    """
    mounts = {}
    for volume in pod.get("volumes", []):
        path = root / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            for key, value in secrets[volume["secret"]["secretName"]].items():
                (path / key).write_text(value)
        mounts[volume["name"]] = path
    paths = {m["mountPath"]: str(mounts[m["name"]]) for m in container.get("volumeMounts", [])}

    def local(text: str) -> str:
        for mount, path in paths.items():
            text = text.replace(mount, path)
        return tokens.get(text, text)

    env = {**os.environ, **extra_env}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = local(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets[ref["name"]]:
                env[item["name"]] = secrets[ref["name"]][ref["key"]]
            assert ref.get("optional") or ref["key"] in secrets[ref["name"]], ref
    argv = [local(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)) for a in container.get("command", []) + container["args"]]
    return argv, env


def _secrets(tls: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {**SECRETS, "deepmr-tls": {name: Path(path).read_text() for name, path in tls.items()}}


def _assert_tls_gpu_worker(address: str, tls: Mapping[str, str], nthreads: int) -> dict:
    """One worker joined over TLS with GPU=1 and the S3 credentials; clients without the certificate or TLS are refused."""
    with Client(address, security=_tls_security(tls), timeout="30s", set_as_default=False) as client:
        client.wait_for_workers(1, timeout=60)
        (worker,) = client.scheduler_info(n_workers=-1)["workers"].values()
        assert worker["resources"] == {"GPU": 1} and worker["nthreads"] == nthreads
        key = client.submit(lambda: os.environ.get("AWS_ACCESS_KEY_ID"), resources={"GPU": 1}).result(30)
        assert key == SECRETS["deepmr-s3"]["AWS_ACCESS_KEY_ID"]
    # what a Client without the certificate, or without TLS, first does (no second Client's IO loop)
    with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
        asyncio.run(connect(address, timeout="5s"))
    with pytest.raises(OSError):  # the handshake over plain TCP is reset
        asyncio.run(connect(address.replace("tls://", "tcp://"), timeout="5s"))
    return worker


def test_daskcluster_pods__run_a_tls_scheduler_and_gpu_worker_that_deepmr_uses(tls, tmp_path, spawn):
    doc = _yaml("daskcluster.yaml")
    name, port = doc["metadata"]["name"], free_port()
    tokens = {"8786": str(port), ":8787": "127.0.0.1:0", "8788": "127.0.0.1:0",
              f"tls://{name}-scheduler:8786": f"tls://127.0.0.1:{port}"}
    secrets = _secrets(tls)
    scheduler_pod = doc["spec"]["scheduler"]["spec"]
    argv, env = _pod_process(scheduler_pod, scheduler_pod["containers"][0], secrets, tmp_path / "scheduler", tokens=tokens)
    spawn([*argv, *LOCAL["scheduler"]], env)
    worker_pod = doc["spec"]["worker"]["spec"]
    argv, env = _pod_process(worker_pod, worker_pod["containers"][0], secrets, tmp_path / "worker",
                             extra_env={"DASK_WORKER_NAME": f"{name}-default-worker-0"}, tokens=tokens)
    spawn([*argv, *LOCAL["worker"]], env)
    address = f"tls://127.0.0.1:{port}"
    worker = _assert_tls_gpu_worker(address, tls, nthreads=4)
    assert worker["name"] == f"{name}-default-worker-0"

    job_pod = _yaml("deepmr-run-job.yaml")["spec"]["template"]["spec"]
    job_tokens = {f"tls://{name}-scheduler:8786": address, str(doc["spec"]["worker"]["replicas"]): "1"}
    argv, env = _pod_process(job_pod, job_pod["initContainers"][0], secrets, tmp_path / "job", tokens=job_tokens)
    subprocess.run(argv, env=env, check=True, timeout=120)  # the init container waits for the workers
    _, job_env = _pod_process(job_pod, job_pod["containers"][0], secrets, tmp_path / "job")
    store = tmp_path / "run.zarr"
    result = subprocess.run(
        ["deepmr", "predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(store),
         "--cluster", address, "-q"],
        env=job_env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    _assert_ism_is_brute_force(store, n_loci=1)


def _helm_chart_commands(values: dict, scheduler_host: str) -> tuple[list[str], list[str]]:
    """The scheduler's and worker's argv as the dask chart's templates build them (dask/helm-chart:
    dask/templates/dask-scheduler-deployment.yaml and dask-worker-deployment.yaml), with the
    scheduler service ``scheduler_host``."""
    scheduler = values["scheduler"]
    port = scheduler.get("servicePort", 8786)
    scheduler_argv = ["dask-scheduler", f"--port={port}", "--dashboard-address=:8787", *scheduler["extraArgs"]]
    worker = values["worker"]
    limits = worker["resources"]["limits"]
    address = worker.get("custom_scheduler_url") or f"{scheduler_host}:{port}"
    worker_argv = [worker["image"]["dask_worker"], address, "--nthreads", str(limits["cpu"]),
                   "--memory-limit", str(limits["memory"]), "--no-dashboard", "--dashboard-address", "8790",
                   *worker["extraArgs"]]
    return scheduler_argv, worker_argv


def test_helm_values__chart_commands_run_a_tls_scheduler_and_gpu_worker(tls, tmp_path, spawn):
    from dask.utils import parse_bytes
    from distributed.system import MEMORY_LIMIT

    values = _yaml("helm-values.yaml")
    port = free_port()
    tokens = {"--port=8786": f"--port={port}", "--dashboard-address=:8787": "--dashboard-address=127.0.0.1:0",
              "tls://deepmr-dask-scheduler:8786": f"tls://127.0.0.1:{port}"}
    scheduler_argv, worker_argv = _helm_chart_commands(values, "deepmr-dask-scheduler")
    path = {"PATH": f"{DEPLOY / 'bin'}{os.pathsep}{os.environ['PATH']}"}  # the image's dask-scheduler/dask-worker
    secrets = _secrets(tls)
    pods = {role: {"volumes": values[role].get("mounts", {}).get("volumes", [])} for role in ("scheduler", "worker")}
    for role, argv in (("scheduler", scheduler_argv), ("worker", worker_argv)):
        container = {"args": argv, "env": values[role]["env"],
                     "volumeMounts": values[role].get("mounts", {}).get("volumeMounts", [])}
        argv, env = _pod_process(pods[role], container, secrets, tmp_path / role, extra_env=path, tokens=tokens)
        spawn([*argv, *LOCAL[role]], env)
    worker = _assert_tls_gpu_worker(f"tls://127.0.0.1:{port}", tls, nthreads=int(values["worker"]["resources"]["limits"]["cpu"]))
    assert worker["memory_limit"] == min(parse_bytes(values["worker"]["resources"]["limits"]["memory"]), MEMORY_LIMIT)


# --- Container ------------------------------------------------------------------------------------


def _pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in requirements}


def test_dockerfile__pins_are_the_tested_versions_and_satisfy_pyproject():
    pins = _pins(DEPLOY / "constraints-gpu.txt")
    for name in ("dask", "distributed", "torch"):
        assert pins[name] == Version(metadata.version(name)).public, name
    assert _pins(REPO / "constraints.txt")["torch"] == pins["torch"]
    project = PYPROJECT["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["s3"]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) in pins:
            assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), line
    for extra in ("slurm", "kubernetes"):  # the extras' pins admit the versions tested here
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            assert requirement.specifier.contains(metadata.version(requirement.name)), line
    # dask-cuda pins other dask versions (every release to 26.10): neither the image nor any extra installs it
    every_requirement = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert "dask-cuda" not in pins and "dask-cuda" not in {canonicalize_name(Requirement(r).name) for r in every_requirement}
    stages = _dockerfile_stages()
    installs = [r for r in stages["base"]["run"] if "uv pip install" in r]
    assert installs and all("-e " not in r and "--editable" not in r for r in installs)
    assert any("--constraint deploy/constraints-gpu.txt" in r and '".[s3]"' in r for r in installs)
    assert any("grep '^torch=='" in r and "--index-url" in r for r in installs)


def test_write_constraints__committed_pins_are_the_installed_versions():
    writer = _load_module(DEPLOY / "write_constraints.py")
    installed = writer.installed_pins(writer.root_requirements(REPO / "pyproject.toml"))
    committed = _pins(DEPLOY / "constraints-gpu.txt")
    stale = {name: (pin, installed.get(name)) for name, pin in committed.items() if installed.get(name) != pin}
    assert not stale, f"regenerate: python deploy/write_constraints.py > deploy/constraints-gpu.txt ({stale})"
    assert {"dask", "distributed", "torch", "zarr", "xarray", "numpy"} <= committed.keys()
