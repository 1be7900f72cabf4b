"""The package's shape: no import cycles, one seam to RecBole, one setup sequence, plain trainer classes."""
from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import pytest
from recbole.trainer import Trainer
from recbole.utils import ModelType

from reveal_recbole import recbole_seam
from reveal_recbole.registry import get_trainer
from reveal_recbole.resources import PACKAGE_DIR
from reveal_recbole.trainer import REVEALTrainer

ROOT = PACKAGE_DIR.parent


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        targets = imported_modules(path, known)
        # importing a.b.c also runs the package a.b's __init__, which is not a dependency to count
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_does_not_import_fve():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith("reveal_recbole.fve"))
                 for m, targets in graph.items() if m.startswith("reveal_recbole.data")}
    assert not any(offenders.values()), offenders


@pytest.mark.parametrize("pattern", ["sys.modules[", "module.torch =", "setattr(importlib.import_module(\"recbole",
                                     "._load_internal_config_dict =", "single_spec\"] = True", "np.str ="])
def test_recbole_internals_are_reached_only_in_the_seam(pattern):
    users = sorted(name for name, path in package_modules().items() if pattern in path.read_text(encoding="utf-8"))
    assert users == ["reveal_recbole.recbole_seam"], users


def test_torch_load_is_never_rebound():
    assert not [name for name, path in package_modules().items() if "torch.load =" in path.read_text(encoding="utf-8")]


def test_the_setup_sequence_is_written_once():
    """``data_preparation`` (and so the dataset/split/model/trainer sequence) is called in pipeline.py only."""
    callers = sorted(name for name, path in package_modules().items()
                     if "data_preparation(" in path.read_text(encoding="utf-8"))
    assert callers == ["reveal_recbole.pipeline"]
    scripts = [*ROOT.glob("run_*.py"), *ROOT.glob("benchmarks/*.py")]
    assert scripts and not [p.name for p in scripts if "data_preparation(" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("trainer_class", [REVEALTrainer, get_trainer(ModelType.SEQUENTIAL, "SASRec")])
def test_trainer_classes_keep_their_names(trainer_class):
    names = [cls.__name__ for cls in trainer_class.__mro__]
    assert len(names) == len(set(names)), names
    assert names.count("Trainer") == 1 and Trainer in trainer_class.__mro__


def test_a_recbole_trainer_is_extended_once():
    first = get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert first is get_trainer(ModelType.SEQUENTIAL, "GRU4Rec")  # both are RecBole's Trainer
    assert first.__name__ == "ExtendedTrainer"


def test_another_recbole_version_is_named_in_a_warning():
    with pytest.warns(RuntimeWarning, match=rf"supports RecBole {recbole_seam.SUPPORTED_RECBOLE}; RecBole 9\.9\.9"):
        recbole_seam.check_recbole("9.9.9")


def test_a_missing_trainer_hook_fails_the_import(monkeypatch):
    monkeypatch.delattr(Trainer, "_save_checkpoint")
    with pytest.raises(ImportError, match=r"Trainer\._save_checkpoint.*recbole==1\.2\.1"):
        recbole_seam.check_recbole()


def test_a_failing_flops_count_is_logged_not_raised(caplog):
    class Unprofilable:
        def predict(self, interaction):
            raise AssertionError("predict is not supported")

    with caplog.at_level(logging.WARNING):
        flops = recbole_seam.count_flops(Unprofilable(), dataset=None, device="cpu", logger=logging.getLogger(),
                                         transform=None)
    assert flops is None
    assert "FLOPs not counted for Unprofilable" in caplog.text


def test_third_party_deprecations_are_quiet_and_ours_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recbole_seam.quiet_third_party_warnings()
        warnings.warn_explicit("Series.fillna with 'method' is deprecated", FutureWarning, "dataset.py", 1,
                               module="recbole.data.dataset")
        warnings.warn_explicit("our own future change", FutureWarning, "config.py", 1, module="reveal_recbole.config")
    assert [str(w.message) for w in caught] == ["our own future change"]
