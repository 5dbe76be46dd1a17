"""The one label map of dfdetect.

It is fixed, never derived from folder sort order: the original service sorted folders
alphabetically (fake = 0) and then read index 0 as "real", inverting every verdict.
"""

REAL = 0
FAKE = 1
CLASS_NAMES = ("real", "fake")  # index == label
LABEL_MAP = {"real": REAL, "fake": FAKE}


def label_of(class_name: str) -> int:
    try:
        return LABEL_MAP[class_name]
    except KeyError:
        raise ValueError(f"unknown class folder {class_name!r}: expected one of {sorted(LABEL_MAP)}") from None


def check_label_map(label_map: dict) -> None:
    """Refuse a stored label map that disagrees with ours (e.g. a model trained by the old service)."""
    if dict(label_map) != LABEL_MAP:
        raise ValueError(f"label map {label_map!r} differs from dfdetect's {LABEL_MAP!r}; refusing to guess")
