from . import architectures as _architectures  # noqa: F401  (registers the shipped models)
from .catalog import ModelError, available_models, count_parameters, create_model, get_spec, register_model

__all__ = ["ModelError", "available_models", "count_parameters", "create_model", "get_spec", "register_model"]
