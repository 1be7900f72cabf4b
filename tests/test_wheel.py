"""The wheel on its own: it ships the yaml files, the bundled dataset and dataset_prep, and it trains.

The wheel is built offline from a copy of the sources (no build/ or egg-info in the checkout), then
installed with pip into a fresh virtual environment that borrows this interpreter's installed
dependencies through a .pth file (no network); a tiny epoch then runs from a folder outside the
source tree, so neither the checkout nor the editable install can stand in for the wheel.
"""
import json
import math
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reveal_recbole", "dataset_prep")
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "README.md")

pytestmark = pytest.mark.slow


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def shipped_files(package_dir: Path) -> set[str]:
    """Files of the source tree the wheel must hold: everything but caches."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in package_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        (source / name).write_bytes((ROOT / name).read_bytes())
    for package in PACKAGES:
        for relative in shipped_files(ROOT / package):
            target = source / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / relative).read_bytes())
    dist = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(source)])
    (built,) = dist.glob("reveal_recbole-*.whl")
    return built


def test_wheel_ships_properties_dataset_and_dataset_prep(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {PurePosixPath(name).parts[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == set(PACKAGES)
    for required in (
        "reveal_recbole/properties/overall.yaml",
        "reveal_recbole/properties/reveal_base.yaml",
        "reveal_recbole/properties/model/SASRecREVEAL.yaml",
        "reveal_recbole/properties/dataset/scientific.yaml",
        "reveal_recbole/properties/hyper/SASRecREVEAL-grid.hyper",
        "reveal_recbole/dataset_example/scientific/scientific.inter",
        "reveal_recbole/dataset_example/scientific/scientific.image.npy",
        "dataset_prep/__init__.py",
        "dataset_prep/convert_decorec.py",
    ):
        assert required in names
    for package in PACKAGES:  # and every other file of the packages: new yaml or data files cannot be forgotten
        missing = shipped_files(ROOT / package) - names
        assert not missing, f"not in the wheel: {sorted(missing)}"


def test_installed_wheel_trains_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       env=env).stdout.strip())
    # the dependencies already installed here, after the venv's own site-packages; their .pth files
    # (the editable install's finder among them) are not processed, so only the wheel provides our packages
    (purelib / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)], env=env)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    script = f"""
import json, sys
import dataset_prep.common
import reveal_recbole
result = reveal_recbole.run_reveal(model="SASRecREVEAL", dataset="scientific", config_dict={{
    "checkpoint_dir": {str(tmp_path / "saved")!r}, "epochs": 1, "hidden_size": 16, "embedding_size": 16,
    "n_layers": 1, "n_heads": 1, "inner_size": 32, "MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 512,
    "eval_batch_size": 1024, "show_progress": False, "state": "WARNING", "visual_utilisation": False,
    "diagnostics_figure": False, "save_resume_points": False,
}})
print(json.dumps({{
    "reveal_recbole": reveal_recbole.__file__, "dataset_prep": dataset_prep.common.__file__,
    "test_result": {{key: float(value) for key, value in result["test_result"].items()}},
}}))
"""
    output = run([python, "-c", script], cwd=workdir, env=env, timeout=600).stdout
    report = json.loads(output.strip().splitlines()[-1])
    for module in ("reveal_recbole", "dataset_prep"):
        assert Path(report[module]).resolve().is_relative_to(purelib.resolve()), report[module]
    metrics = report["test_result"]
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert key in metrics and math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0
