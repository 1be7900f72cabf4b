"""Files shipped with the package: the ``properties/`` yaml defaults and the bundled datasets."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def properties_dir() -> Path:
    """The ``properties/`` folder: inside the package when installed as a wheel, beside it in a checkout."""
    for candidate in (PACKAGE_DIR / "properties", PACKAGE_DIR.parent / "properties"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"reveal-recbole's properties/ folder was not found next to {PACKAGE_DIR}; "
        "install the package from its source tree with `pip install -e .`"
    )


def bundled_datasets_dir() -> Path:
    return PACKAGE_DIR / "dataset_example"
