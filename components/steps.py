"""The step functions that become KFP components. Each imports dfdetect and calls the same function as the
DVC stage; KFP serialises each function on its own, so imports live inside the bodies."""

from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def fetch_data(data_source: str, dvc_repo: str, dvc_rev: str, data: Output[Dataset]):
    """The data set from the DVC remote at a git revision (data_source 'dvc') or from a folder."""
    from dfdetect.data_fetch import fetch_data as fetch

    fetch(data_source, dvc_repo, dvc_rev, data.path)


def prepare(data: Input[Dataset], prepare: dict, prepared: Output[Dataset], report: Output[Markdown]):
    """`dfdetect prepare`: validate, manifest, report, image cache."""
    import shutil

    from dfdetect.overrides import params_from
    from dfdetect.prepare import prepare as run_prepare

    run_prepare(data.path, prepared.path, params_from({"prepare": prepare}).prepare, workers=2)
    shutil.copy(f"{prepared.path}/report.md", report.path)


def train(
    prepared: Input[Dataset],
    seed: int,
    model: dict,
    train: dict,
    mlflow: dict,
    tracking_uri: str,
    model_dir: Output[Model],
    history: Output[Artifact],
) -> str:
    """`dfdetect train`; returns the MLflow run id."""
    from dfdetect.overrides import params_from
    from dfdetect.tracking import use_tracking_uri
    from dfdetect.train import train as run_train

    use_tracking_uri(tracking_uri)
    params = params_from({"seed": seed, "model": model, "train": train, "mlflow": mlflow})
    result = run_train(params, prepared.path, model_dir.path, history.path)
    # the artifact's own validation ROC-AUC: after a WiSE-FT mix (train.wise_alpha) not the best epoch's
    model_dir.metadata.update(
        {"run_id": result.run_id, "best_epoch": result.best_epoch, "val_auc": result.model_val_auc}
    )
    return result.run_id or ""


def evaluate(
    prepared: Input[Dataset],
    model_dir: Input[Model],
    evaluate: dict,
    mlflow: dict,
    tracking_uri: str,
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
) -> float:
    """`dfdetect evaluate`; returns the test ROC-AUC that gates registration."""
    from dfdetect.evaluate import evaluate as run_evaluate
    from dfdetect.kfp_outputs import log_kfp_evaluation
    from dfdetect.overrides import params_from
    from dfdetect.tracking import use_tracking_uri

    use_tracking_uri(tracking_uri)
    params = params_from({"evaluate": evaluate, "mlflow": mlflow})
    out = evaluation.path
    result = run_evaluate(params, prepared.path, model_dir.path, out, f"{out}/metrics.json", f"{out}/plots")
    log_kfp_evaluation(result, out, metrics, roc, report)
    return float(result["roc_auc"])


def register(
    prepared: Input[Dataset],
    model_dir: Input[Model],
    evaluation: Input[Artifact],
    registry: dict,
    mlflow: dict,
    tracking_uri: str,
) -> str:
    """`dfdetect register`: a new model version with alias challenger; returns the version."""
    from dfdetect.overrides import params_from
    from dfdetect.registry import register as run_register
    from dfdetect.tracking import use_tracking_uri

    use_tracking_uri(tracking_uri)
    params = params_from({"registry": registry, "mlflow": mlflow})
    return run_register(params, model_dir.path, f"{evaluation.path}/metrics.json", prepared.path)["version"]


def promote(
    prepared: Input[Dataset],
    version: str,
    prepare: dict,
    evaluate: dict,
    registry: dict,
    promotion: dict,
    mlflow: dict,
    tracking_uri: str,
    report: Output[Markdown],
) -> str:
    """`dfdetect promote` of the version just registered; returns the verdict. `evaluate` lists the suite sets
    that `promotion.dataset_floors` re-scores, cropped as `prepare.faces` says."""
    import shutil
    import tempfile

    from dfdetect.overrides import params_from
    from dfdetect.promotion import promote as run_promote
    from dfdetect.tracking import use_tracking_uri

    use_tracking_uri(tracking_uri)
    params = params_from(
        {"prepare": prepare, "evaluate": evaluate, "registry": registry, "promotion": promotion, "mlflow": mlflow}
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = run_promote(params, prepared.path, tmp, expected_challenger=version)
        shutil.copy(f"{tmp}/promotion.md", report.path)
    return result["verdict"]


def monitor(
    prediction_log: str,
    registry: dict,
    serving: dict,
    monitor: dict,
    mlflow: dict,
    tracking_uri: str,
    report: Output[Artifact],
) -> bool:
    """`dfdetect monitor` of the served version; returns whether the loop should retrain (drift, or enough
    reviewed verdicts)."""
    from dfdetect.monitor import monitor as run_monitor
    from dfdetect.overrides import params_from
    from dfdetect.tracking import use_tracking_uri

    use_tracking_uri(tracking_uri)
    params = params_from({"registry": registry, "serving": serving, "monitor": monitor, "mlflow": mlflow})
    return bool(run_monitor(params, prediction_log, report.path)["retrain"])


def export_feedback(prediction_log: str, feedback: Output[Dataset]) -> int:
    """`dfdetect feedback export`: the reviewed verdicts with kept images as a data set; returns how many
    (0 and an empty folder when there are none yet)."""
    from dfdetect.feedback_export import export_feedback_or_nothing

    return export_feedback_or_nothing(prediction_log, feedback.path)


def prepare_with_feedback(
    data: Input[Dataset], feedback: Input[Dataset], prepare: dict, prepared: Output[Dataset], report: Output[Markdown]
):
    """`dfdetect prepare` with the reviewed data set as one more source of the mixture (when it has images)."""
    import shutil

    from dfdetect.feedback_export import with_feedback_source
    from dfdetect.overrides import params_from
    from dfdetect.prepare import prepare as run_prepare

    params = with_feedback_source(params_from({"prepare": prepare}).prepare, feedback.path)
    run_prepare(data.path, prepared.path, params, workers=2)
    shutil.copy(f"{prepared.path}/report.md", report.path)
