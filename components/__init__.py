"""Kubeflow Pipelines components of dfdetect: thin wrappers over the library, one per pipeline step.

`make_components(image)` builds them for a container image (the project's image from infra/), so the image
is a compile-time parameter and the step code lives once, in `components/steps.py`.
"""

from types import SimpleNamespace

from kfp import dsl

from . import steps

STEPS = (
    "fetch_data",
    "prepare",
    "train",
    "evaluate",
    "register",
    "promote",
    "monitor",
    "export_feedback",
    "prepare_with_feedback",
)


def make_components(image: str) -> SimpleNamespace:
    # install_kfp_package=False: the image already has kfp (and a local run has it in this interpreter).
    return SimpleNamespace(
        **{name: dsl.component(getattr(steps, name), base_image=image, install_kfp_package=False) for name in STEPS}
    )
