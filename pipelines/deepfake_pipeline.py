"""prepare -> train -> evaluate -> (if the test ROC-AUC clears the bar) register -> promote, as a KFP v2 pipeline.

Pipeline parameters mirror params.yaml, one per section, with params.yaml's values as defaults; the data comes
from the DVC remote at a git revision (or a folder), and every step logs to the given MLflow tracking URI.
"""

from kfp import dsl

from components import make_components
from dfdetect.config import Params
from dfdetect.overrides import pipeline_sections

DEFAULT_IMAGE = "ghcr.io/dfdetect/dfdetect:0.1.0"  # built from infra/; override with --image
PIPELINE_NAME = "dfdetect-deepfake-detector"


def min_roc_auc_to_register(params: Params) -> float:
    """A model below the promotion floor could never become champion: not worth a registry version."""
    return float(params.promotion.floors.get("roc_auc", 0.0))


def build_pipeline(params: Params, image: str = DEFAULT_IMAGE):
    c = make_components(image)
    d = pipeline_sections(params)
    min_auc = min_roc_auc_to_register(params)

    @dsl.pipeline(name=PIPELINE_NAME, description="Train, evaluate, register and promote a deepfake image detector.")
    def deepfake_pipeline(
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
        mlflow: dict = d["mlflow"],
    ):
        data = c.fetch_data(data_source=data_source, dvc_repo=dvc_repo, dvc_rev=dvc_rev)
        data.set_caching_options(False)  # the same revision name ("HEAD") can mean new data
        prepared = c.prepare(data=data.outputs["data"], prepare=prepare)
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

    return deepfake_pipeline


def train_to_promotion(
    c, prepared, seed, model, train, prepare, evaluate, registry, promotion, mlflow, tracking_uri, min_auc
):
    """train -> evaluate -> (if the test ROC-AUC clears min_auc) register -> promote: the part every pipeline
    that trains shares (this one, and monitor-and-retrain)."""
    trained = c.train(
        prepared=prepared.outputs["prepared"],
        seed=seed,
        model=model,
        train=train,
        mlflow=mlflow,
        tracking_uri=tracking_uri,
    )
    trained.set_cpu_request("2").set_memory_request("8G")
    evaluated = c.evaluate(
        prepared=prepared.outputs["prepared"],
        model_dir=trained.outputs["model_dir"],
        evaluate=evaluate,
        mlflow=mlflow,
        tracking_uri=tracking_uri,
    )
    with dsl.If(evaluated.outputs["Output"] >= min_auc, name="good-enough-to-register"):
        registered = c.register(
            prepared=prepared.outputs["prepared"],
            model_dir=trained.outputs["model_dir"],
            evaluation=evaluated.outputs["evaluation"],
            registry=registry,
            mlflow=mlflow,
            tracking_uri=tracking_uri,
        )
        registered.set_caching_options(False)  # registering is a side effect: never skip it
        promoted = c.promote(
            prepared=prepared.outputs["prepared"],
            version=registered.output,
            prepare=prepare,
            evaluate=evaluate,
            registry=registry,
            promotion=promotion,
            mlflow=mlflow,
            tracking_uri=tracking_uri,
        )
        promoted.set_caching_options(False)
