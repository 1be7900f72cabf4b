"""Files shipped with the package: the ``properties/`` yaml defaults and the bundled datasets."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def properties_dir() -> Path:
    """The ``properties/`` folder, shipped inside the package (the checkout's top-level one links to it)."""
    candidate = PACKAGE_DIR / "properties"
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(
        f"reveal-recbole's properties/ folder was not found in {PACKAGE_DIR}; reinstall the package"
    )


def bundled_datasets_dir() -> Path:
    return PACKAGE_DIR / "dataset_example"
