"""dvc.yaml deps tell the truth: every dlpipe module a stage imports (directly or transitively, module-level or
lazily inside a function) is covered by one of the stage's deps, so a code change can never leave an output
that `dvc repro` thinks is current. The imports are read statically (ast) from the live source: no import of
dlpipe, no subprocess, no training.

The model: every stage runs `python -m dlpipe <stage> [model]`, i.e. `dlpipe/__init__.py`, `dlpipe.__main__`,
`dlpipe.cli` and the stage function in `dlpipe.stages`. Of `stages.py` only its module-level imports and those
inside that stage's function (and the module's helper functions it calls) count, since each stage imports
different things; of every other module all imports count, at any nesting level (conservative: the CLI path
runs the lazy imports, e.g. `load_config` always imports `dlpipe.tasks` and `dlpipe.models`)."""

from __future__ import annotations

import ast
import copy
import functools
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
PACKAGE = "dlpipe"
STAGES_MODULE = f"{PACKAGE}.stages"
ENTRY_MODULES = (f"{PACKAGE}.__main__", f"{PACKAGE}.cli")

# Files each stage reads besides code and params.yaml, found by reading stages.py, tasks/*.py and evaluate.py.
# Not derivable by ast (they are computed paths), so pinned here: dropping one from dvc.yaml fails the test.
DATA_READS = {
    "fetch_images": ["${data.images.folder}"],  # the `folder` source: new images rerun the stage
    "fetch_stocks": ["data/samples/stocks"],
    "augment": ["data/images/raw"],
    # ${key} is the model, ${item} the dataset params `models` gives it (see test_dataset_dirs_hold_...).
    "train": ["data/${item}"],
    "export": ["models/${key}/best.ckpt", "models/${key}/train.json", "data/${item}"],
    "evaluate": [
        "models/${key}/best.ckpt",
        "models/${key}/train.json",
        "models/${key}/model.onnx",
        "models/${key}/model.int8.onnx",
        "models/${key}/export.json",
        "data/${item}",
    ],
    # Generators (${item} is their `generators` entry): their judge's checkpoint besides their dataset.
    "train_generator": ["data/${item.data}", "models/${item.features}/best.ckpt"],
    "export_generator": ["models/${key}/best.ckpt", "models/${key}/train.json", "data/${item.data}"],
    "evaluate_generator": [
        "models/${key}/best.ckpt",
        "models/${key}/train.json",
        "models/${key}/model.onnx",
        "models/${key}/model.int8.onnx",
        "models/${key}/export.json",
        "data/${item.data}",
        "models/${item.features}/best.ckpt",
    ],
    "report": [
        "reports/metrics",
        "reports/plots",
        "reports/figures/augment_preview.png",
        "reports/transfer",
        "reports/distill",
        "reports/cost/depthwise.json",
        "reports/cost/depthwise.png",
    ],
    "distill": ["data/images", "models/${distill.teacher}/best.ckpt"],
    "transfer": ["data/images/raw"],
    "cost": [],  # random inputs: standard vs depthwise convolution, no data
}


# ------------------------------------------------------------------------------------------- modules and files
@functools.cache
def module_files() -> dict[str, Path]:
    """Every dlpipe module name -> its source file (a package is its `__init__.py`)."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def is_package(module: str) -> bool:
    return module_files()[module].name == "__init__.py"


def with_parents(module: str) -> set[str]:
    """`dlpipe.a.b` and the packages whose `__init__.py` importing it runs: `dlpipe`, `dlpipe.a`."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & module_files().keys()


def resolve(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The dlpipe modules (with their parent packages) one import statement in `module` executes."""
    known = module_files()
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        if node.level:  # relative: from the package itself (an __init__) or the module's package
            base = module.split(".") if is_package(module) else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from pkg import name` imports submodule pkg.name when there is one (else name is an attribute).
        targets = {source} | {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known}
    found = set()
    for target in targets:
        if target == PACKAGE or target.startswith(f"{PACKAGE}."):
            found |= with_parents(target)
    return found


def imports_in(nodes, module: str) -> set[str]:
    """Imports anywhere under `nodes` (functions, branches, TYPE_CHECKING blocks included)."""
    found = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found |= resolve(node, module)
    return found


@functools.cache
def parse(module: str) -> ast.Module:
    return ast.parse(module_files()[module].read_text(), filename=str(module_files()[module]))


@functools.cache
def all_imports(module: str) -> frozenset[str]:
    return frozenset(imports_in([parse(module)], module))


def stage_imports(function: str) -> set[str]:
    """What `stages.py` runs for one stage: its module-level code, the stage function and the module's own
    functions that one calls (transitively), but not the other stage functions' lazy imports."""
    tree = parse(STAGES_MODULE)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    if function not in functions:
        raise LookupError(f"{STAGES_MODULE} has no function {function!r}")
    found = set()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found |= imports_in([node], STAGES_MODULE)
        else:  # decorators and defaults run at import
            at_import = [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]
            found |= imports_in([part for part in at_import if part is not None], STAGES_MODULE)
    todo, seen = [function], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found |= imports_in(functions[name].body, STAGES_MODULE)
        calls = [node.func for node in ast.walk(functions[name]) if isinstance(node, ast.Call)]
        todo.extend({func.id for func in calls if isinstance(func, ast.Name)} & functions.keys())
    return found


def stage_modules(function: str) -> set[str]:
    """Transitive closure of the dlpipe modules `python -m dlpipe <function>` imports."""
    todo = [m for entry in ENTRY_MODULES for m in with_parents(entry)]
    seen = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(stage_imports(function) if module == STAGES_MODULE else all_imports(module))
    return seen


# ---------------------------------------------------------------------------------------------------- dvc.yaml
def load_dvc_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def stage_body(definition: dict) -> dict:
    """The stage itself, or the `do` block of a `foreach` stage."""
    return definition["do"] if "foreach" in definition else definition


def stage_deps(definition: dict) -> list[str]:
    deps = stage_body(definition).get("deps") or []
    return [str(next(iter(dep)) if isinstance(dep, dict) else dep).removeprefix("./").rstrip("/") for dep in deps]


def stage_function(definition: dict) -> str:
    """`python -m dlpipe train ${item}` -> `train`."""
    words = shlex.split(stage_body(definition)["cmd"])
    assert words[:3] == ["python", "-m", PACKAGE] and len(words) > 3, f"not a dlpipe stage: {words}"
    return words[3]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(f"{dep}/") for dep in deps)


def missing_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    """Per dvc.yaml stage, the source files of modules it imports that none of its deps covers."""
    missing = {}
    for name, definition in dvc_yaml["stages"].items():
        deps = stage_deps(definition)
        files = {module_files()[m].relative_to(REPO_ROOT).as_posix() for m in stage_modules(stage_function(definition))}
        if absent := sorted(path for path in files if not covered(path, deps)):
            missing[name] = absent
    return missing


# ------------------------------------------------------------------------------------------------------- tests
def test_every_stage_runs_a_stage_function():
    stages_tree = parse(STAGES_MODULE)
    functions = {node.name for node in stages_tree.body if isinstance(node, ast.FunctionDef)}
    for name, definition in load_dvc_yaml()["stages"].items():
        assert stage_function(definition) in functions, f"dvc.yaml stage {name!r} runs an unknown stage"


def test_deps_cover_every_imported_module():
    missing = missing_deps(load_dvc_yaml())
    assert not missing, "dvc.yaml deps miss imported modules:\n" + "\n".join(
        f"  {stage}: {', '.join(paths)}" for stage, paths in missing.items()
    )


@pytest.mark.parametrize("removed", ["src/dlpipe/config.py", "src/dlpipe/tasks"])
def test_checker_reports_a_removed_dep(removed):
    dvc_yaml = load_dvc_yaml()
    before = missing_deps(dvc_yaml)
    broken = copy.deepcopy(dvc_yaml)
    body = stage_body(broken["stages"]["train"])
    assert removed in body["deps"]
    body["deps"].remove(removed)
    after = missing_deps(broken)
    reported = set(after.get("train", [])) - set(before.get("train", []))
    assert reported and all(covered(path, [removed]) for path in reported)
    assert {stage: paths for stage, paths in after.items() if stage != "train"} == {
        stage: paths for stage, paths in before.items() if stage != "train"
    }


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("dlpipe.cli", "import dlpipe.data.images", {"dlpipe", "dlpipe.data", "dlpipe.data.images"}),
        ("dlpipe.cli", "from dlpipe import stages, __version__", {"dlpipe", "dlpipe.stages"}),
        ("dlpipe.tasks.classifier", "from .base import Task", {"dlpipe", "dlpipe.tasks", "dlpipe.tasks.base"}),
        ("dlpipe.tasks.classifier", "from .. import plots", {"dlpipe", "dlpipe.plots"}),
        ("dlpipe.tasks", "from . import classifier", {"dlpipe", "dlpipe.tasks", "dlpipe.tasks.classifier"}),
        ("dlpipe.cli", "import numpy, yaml as y", set()),
    ],
)
def test_resolve_imports(module, source, expected):
    assert resolve(ast.parse(source).body[0], module) == expected


def test_import_analysis_follows_lazy_and_package_imports():
    # The facts the model relies on, so a checker that silently finds nothing cannot pass the test above.
    modules = stage_modules("report")
    assert f"{PACKAGE}.config" in modules and f"{PACKAGE}.report" in modules  # lazy import in cli.run/report()
    assert f"{PACKAGE}.tasks" in modules and f"{PACKAGE}.models" in modules  # lazy imports in config.py
    assert f"{PACKAGE}.train" not in modules  # another stage's lazy import in stages.py does not count
    assert f"{PACKAGE}.train" in stage_modules("train")


def test_src_deps_exist():
    for name, definition in load_dvc_yaml()["stages"].items():
        for dep in stage_deps(definition):
            if dep.startswith("src/"):
                assert (REPO_ROOT / dep).exists(), f"dvc.yaml stage {name!r}: dep {dep} does not exist"


def test_every_stage_says_what_it_reads():
    assert set(load_dvc_yaml()["stages"]) <= set(DATA_READS), "add the stage's data files to DATA_READS"


@pytest.mark.parametrize("stage", sorted(DATA_READS))
def test_deps_list_the_files_a_stage_reads(stage):
    deps = stage_deps(load_dvc_yaml()["stages"][stage])
    assert not [path for path in DATA_READS[stage] if not covered(path, deps)], deps


def test_dataset_dirs_hold_what_each_task_reads(tmp_path):
    # `data/${item}` is enough only if every file a task's stages read lies under its dataset's directory.
    from dlpipe.config import DATASETS, Paths
    from dlpipe.tasks import get_task, list_tasks

    paths = Paths(tmp_path)
    reads = {"images": [paths.raw_images, paths.augmented], "stocks": [paths.raw_stocks, paths.prices("GOOG")]}
    assert set(reads) == set(DATASETS)
    for dataset, files in reads.items():
        assert all(path.is_relative_to(paths.dataset(dataset)) for path in files)
        others = [paths.dataset(other) for other in DATASETS if other != dataset]
        assert not any(path.is_relative_to(other) for path in files for other in others)
    assert {get_task(name).dataset for name in list_tasks()} <= set(DATASETS)
