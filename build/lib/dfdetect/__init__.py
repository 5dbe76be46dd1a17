"""dfdetect: train, evaluate, register and serve deepfake image detectors.

Importing the package has no side effects: no configuration is read and nothing heavy is imported.
"""

from .labels import CLASS_NAMES, LABEL_MAP

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "LABEL_MAP", "__version__"]
