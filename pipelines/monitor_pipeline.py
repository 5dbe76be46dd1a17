"""monitor -> (if drift, or enough reviewed verdicts) export the reviews -> prepare the data with them ->
train -> evaluate -> register -> the usual promotion gate: the loop from production back to training, as a
KFP v2 pipeline that a recurring run (cron) starts. Parameters mirror params.yaml like the training pipeline's."""

from kfp import dsl

from components import make_components
from dfdetect.config import Params
from dfdetect.overrides import pipeline_sections

from .deepfake_pipeline import DEFAULT_IMAGE, min_roc_auc_to_register, train_to_promotion

MONITOR_PIPELINE_NAME = "dfdetect-monitor-and-retrain"


def build_monitor_pipeline(params: Params, image: str = DEFAULT_IMAGE):
    c = make_components(image)
    d = pipeline_sections(params)
    min_auc = min_roc_auc_to_register(params)

    @dsl.pipeline(
        name=MONITOR_PIPELINE_NAME,
        description="Check the served model's traffic for drift; retrain on the data and the reviewed items "
        "when it drifted or enough reviews came, and put the new model through the promotion gate.",
    )
    def monitor_and_retrain(
        prediction_log: str,
        data_source: str = "dvc",
        dvc_repo: str = "",
        dvc_rev: str = "HEAD",
        tracking_uri: str = "",
        register_min_roc_auc: float = min_auc,
        seed: int = d["seed"],
        prepare: dict = d["prepare"],
        model: dict = d["model"],
        train: dict = d["train"],
        evaluate: dict = d["evaluate"],
        registry: dict = d["registry"],
        promotion: dict = d["promotion"],
        serving: dict = d["serving"],
        monitor: dict = d["monitor"],
        mlflow: dict = d["mlflow"],
    ):
        checked = c.monitor(
            prediction_log=prediction_log,
            registry=registry,
            serving=serving,
            monitor=monitor,
            mlflow=mlflow,
            tracking_uri=tracking_uri,
        )
        checked.set_caching_options(False)  # the log grows: the same arguments mean a new window
        with dsl.If(checked.outputs["Output"] == True, name="drift-or-enough-reviews"):  # noqa: E712 (KFP condition)
            reviewed = c.export_feedback(prediction_log=prediction_log)
            reviewed.set_caching_options(False)
            data = c.fetch_data(data_source=data_source, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
            data.set_caching_options(False)
            prepared = c.prepare_with_feedback(
                data=data.outputs["data"], feedback=reviewed.outputs["feedback"], prepare=prepare
            )
            train_to_promotion(
                c,
                prepared,
                seed,
                model,
                train,
                prepare,
                evaluate,
                registry,
                promotion,
                mlflow,
                tracking_uri,
                register_min_roc_auc,
            )

    return monitor_and_retrain
