"""dvc.yaml against the code and the settings: a stage re-runs when, and only when, something it
uses changes.

* Code: each stage depends on every ``tumorseg`` module its script imports, directly or through
  other modules, lazy (function-level) imports included. Computed from the source tree, so a
  module that is moved, split or added shows up here without editing this file.
* Settings: each stage lists its own params.yaml keys and, of ``profiles``, only the overrides of
  those keys (never the whole section: a quick-profile epoch count must not re-download the data).
* Models: the model list is declared once (``vars`` in dvc.yaml); whatever dvc.yaml still has to
  spell out per model must name exactly :data:`tumorseg.models.MODEL_NAMES`.

The stages are read through DVC itself (its ``vars``/``foreach`` interpolation), in a scratch copy.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
import yaml

from helpers import PROJECT_ROOT

SRC = PROJECT_ROOT / "src"
PACKAGE = "tumorseg"
PARAMS_FILE = "params.yaml"
CODE_DIRS = ("src/", "stages/")  # paths under these are code, not per-model data


# --------------------------------------------------------------------------------------------
# dvc.yaml as DVC resolves it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    """name -> resolved DVC stage (``train@unet``...), from a copy of dvc.yaml and params.yaml."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvcyaml")
    for name in ("dvc.yaml", PARAMS_FILE):
        shutil.copy(PROJECT_ROOT / name, root / name)
    repo = Repo.init(str(root), no_scm=True)
    try:
        return dict(load_file(repo, "dvc.yaml").stages.items())
    finally:
        repo.close()


def path_deps(stage) -> list[str]:
    from dvc.dependency import ParamsDependency

    return [str(PurePosixPath(dep.def_path)) for dep in stage.deps if not isinstance(dep, ParamsDependency)]


def param_keys(stage) -> list[str]:
    """The params.yaml keys a stage lists (``- profile``, ``- train``, ``- augment.rotate``...)."""
    from dvc.dependency import ParamsDependency

    keys: list[str] = []
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency) and PurePosixPath(dep.def_path).name == PARAMS_FILE:
            assert dep.params, f"stage {stage.name}: depends on the whole {PARAMS_FILE}; list its keys"
            keys += list(dep.params)
    return keys


def stage_paths(stage) -> list[str]:
    return path_deps(stage) + [str(PurePosixPath(out.def_path)) for out in stage.outs]


# --------------------------------------------------------------------------------------------
# 1. Each stage depends on the code it runs
# --------------------------------------------------------------------------------------------


def module_file(name: str) -> Path | None:
    """The file that defines module ``name`` under src/ (a package: its __init__.py), or None."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str | None, is_package: bool) -> Iterator[str]:
    """Every module name an import in ``tree`` may load: top-level and lazy (in a function) alike;
    ``from pkg import name`` yields ``pkg.name`` too (a submodule, if such a file exists).
    Imports under ``if TYPE_CHECKING:`` never run and are skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..pkg import y
                if module is None:
                    continue
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "import_module") or (isinstance(func, ast.Name) and func.id == "import_module"):
                yield node.args[0].value  # importlib.import_module("tumorseg.x")
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, module: str | None = None) -> set[str]:
    """The ``tumorseg`` modules (with their parent packages) that the file at ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for name in _imported_names(tree, module, path.name == "__init__.py"):
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:end])
            if module_file(prefix) is not None:
                found.add(prefix)
    return found


def module_closure(script: Path) -> dict[str, list[str]]:
    """module -> import chain from ``script``, for every ``tumorseg`` module it loads."""
    chains: dict[str, list[str]] = {}
    queue = [(name, [name]) for name in sorted(imported_modules(script))]
    while queue:
        name, chain = queue.pop(0)
        if name in chains:
            continue
        chains[name] = chain
        queue += [(child, [*chain, child]) for child in sorted(imported_modules(module_file(name), name)) if child not in chains]
    return chains


def stage_entry_points(cmd: str) -> tuple[list[Path], list[str]]:
    """The Python scripts (``python stages/x.py``) and modules (``python -m tumorseg.x``) a cmd runs."""
    scripts, modules = [], []
    for command in cmd if isinstance(cmd, list) else [cmd]:
        words = shlex.split(command)
        for index, word in enumerate(words):
            if word.endswith(".py") and (PROJECT_ROOT / word).is_file():
                scripts.append(PROJECT_ROOT / word)
            elif word == "-m" and index + 1 < len(words) and words[index + 1].split(".")[0] == PACKAGE:
                modules.append(words[index + 1])
    return scripts, modules


def covered(path: str, deps: list[str]) -> bool:
    """A dep that is the file itself or a folder holding it."""
    return any(path == dep.rstrip("/") or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_each_stage_depends_on_the_code_it_runs(stages):
    problems = []
    for name, stage in stages.items():
        deps = path_deps(stage)
        scripts, modules = stage_entry_points(stage.cmd)
        if not scripts and not modules:
            problems.append(f"{name}: no Python script (stages/x.py) or `-m tumorseg...` in its cmd {stage.cmd!r}")
            continue
        chains: dict[str, list[str]] = {}
        for script in scripts:
            relative = script.relative_to(PROJECT_ROOT).as_posix()
            if not covered(relative, deps):
                problems.append(f"{name}: runs {relative} but does not depend on it")
            for module, chain in module_closure(script).items():
                chains.setdefault(module, [relative, *chain])
        for entry in modules:
            for module in sorted({entry} | {".".join(entry.split(".")[:i]) for i in range(1, entry.count(".") + 1)}):
                chains.setdefault(module, [module])
                for child, chain in module_closure(module_file(module)).items():
                    chains.setdefault(child, [module, *chain])
        for module, chain in sorted(chains.items()):
            file = module_file(module).relative_to(PROJECT_ROOT).as_posix()
            if not covered(file, deps):
                problems.append(f"{name}: imports {module} ({file}) but does not depend on it; via {' -> '.join(chain)}")
    assert not problems, "dvc.yaml: a stage misses code it runs (add the file, or its package folder, to its deps):\n" + "\n".join(problems)


def test_code_folders_hash_without_python_caches(stages, tmp_path):
    """A folder dep is hashed whole: without .dvcignore leaving out __pycache__, the first import
    of any module in it (a test, `tumorseg serve`) would mark every stage that depends on it changed."""
    from dvc.repo import Repo

    folders = sorted(
        {dep for stage in stages.values() for dep in path_deps(stage) if (PROJECT_ROOT / dep).is_dir() and any((PROJECT_ROOT / dep).rglob("*.py"))}
    )
    if (PROJECT_ROOT / ".dvcignore").is_file():
        shutil.copy(PROJECT_ROOT / ".dvcignore", tmp_path / ".dvcignore")
    repo = Repo.init(str(tmp_path), no_scm=True)
    try:
        caches = [f"{folder}/__pycache__/mod.cpython-311.pyc" for folder in folders]
        exposed = [cache for cache in caches if not repo.dvcignore.is_ignored_file(str(tmp_path / cache))]
    finally:
        repo.close()
    assert not exposed, f"add `__pycache__/` to .dvcignore: DVC hashes these into the code deps {folders}:\n" + "\n".join(exposed)


def test_module_closure_follows_lazy_and_submodule_imports(tmp_path, monkeypatch):
    """The import scan itself: lazy imports, `from pkg import submodule`, parents' __init__ files,
    relative imports; TYPE_CHECKING-only imports and names that are not modules are left out."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from tumorseg.sub import c\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tumorseg.d\n",
        "d.py": "",
        "sub/__init__.py": "from .c import VALUE\n",
        "sub/c.py": "VALUE = 1\nfrom tumorseg.a import f as g\n",
    }
    for relative, text in files.items():
        (package / relative).write_text(text)
    script = tmp_path / "script.py"
    script.write_text("import os\nfrom tumorseg import b\n\ndef main():\n    import tumorseg.a\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    closure = module_closure(script)
    assert set(closure) == {"tumorseg", "tumorseg.a", "tumorseg.b", "tumorseg.sub", "tumorseg.sub.c"}
    assert closure["tumorseg.sub.c"] == ["tumorseg.a", "tumorseg.sub.c"]


# --------------------------------------------------------------------------------------------
# 2. Each stage depends on its own params keys, and on the profile overrides of those only
# --------------------------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def overlaps(a: str, b: str) -> bool:
    """Dotted keys that share values: equal, or one a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def exists(params: dict, dotted: str) -> bool:
    node: object = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_each_stage_depends_on_its_own_params_and_their_profile_overrides_only(stages):
    params = yaml.safe_load((PROJECT_ROOT / PARAMS_FILE).read_text(encoding="utf-8"))
    profiles = params.get("profiles") or {}
    overrides = {f"profiles.{profile}.{key}": key for profile, values in profiles.items() for key in flatten(values or {})}
    problems = []
    for name, stage in stages.items():
        keys = param_keys(stage)
        # `dvc repro` stops at a listed key that params.yaml lacks ("Parameters ... are missing")
        problems += [f"{name}: lists `{key}`, which {PARAMS_FILE} does not have" for key in keys if not exists(params, key)]
        own = [key for key in keys if key != "profile" and not key.startswith("profiles")]
        listed = [key for key in keys if key.startswith("profiles.")]
        if "profiles" in keys or any(key.count(".") < 2 for key in listed):
            problems.append(f"{name}: lists a whole profile (`profiles` or `profiles.<name>`); list the overrides of its own keys")
        needed = {override: key for override, key in overrides.items() if any(overlaps(key, mine) for mine in own)}
        for override in sorted(needed):
            if not any(override == key or override.startswith(key + ".") for key in listed):
                problems.append(f"{name}: `{override}` overrides `{needed[override]}`, which it depends on, but is not in its params")
        if needed and "profile" not in keys:
            problems.append(f"{name}: profiles override its settings, but it does not depend on `profile`")
        for key in listed:  # only the overrides of its own keys: others must not re-run it
            section = key.split(".", 2)[2] if key.count(".") >= 2 else ""
            if not any(overlaps(section, mine) for mine in own):
                problems.append(f"{name}: lists `{key}`, which overrides nothing the stage depends on")
    assert not problems, "dvc.yaml params:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# 3. The model list: declared once, and what is spelt out per model matches it
# --------------------------------------------------------------------------------------------


def model_names() -> tuple[str, ...]:
    from tumorseg.models import MODEL_NAMES

    return tuple(MODEL_NAMES)


def ensemble_names() -> set[str]:
    """Names the pipeline writes beside the models' (``ENSEMBLE = "ensemble"``), from the source."""
    pattern = re.compile(r'^ENSEMBLE\s*(?::\s*str\s*)?=\s*"(\w+)"', re.M)
    return {match for path in SRC.rglob("*.py") for match in pattern.findall(path.read_text(encoding="utf-8"))}


def _word(name: str) -> str:
    return rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])"


def per_model_paths(paths: set[str], names: tuple[str, ...]) -> dict[str, set[str]]:
    """``template -> names filling it`` for each path that names a model, e.g.
    ``models/{}.keras -> {unet, umobilenetv2}``; any word in a template's slot counts, so a path
    left behind for a model that no longer exists shows up too."""
    templates = set()
    for path in paths:
        for name in names:
            for match in re.finditer(_word(name), path):
                templates.add(path[: match.start()] + "{}" + path[match.end() :])
    found: dict[str, set[str]] = {}
    for template in templates:
        before, after = template.split("{}", 1)  # one slot per template: the first
        pattern = re.compile(re.escape(before) + r"([A-Za-z0-9]+)" + re.escape(after).replace(r"\{\}", r"[A-Za-z0-9]+"))
        found[template] = {match[1] for path in paths if (match := pattern.fullmatch(path))}
    return found


def test_every_per_model_path_names_exactly_the_models(stages):
    names = model_names()
    trained = sorted(name.split("@", 1)[1] for name in stages if name.startswith("train@"))
    assert trained == sorted(names), f"dvc.yaml trains {trained}; tumorseg.models.MODEL_NAMES is {list(names)} (edit `vars:` in dvc.yaml)"

    problems = []
    for name, stage in stages.items():  # --models as the cmd passes it (the interpolated vars list)
        words = shlex.split(stage.cmd)
        if "--models" in words:
            given = []
            for word in words[words.index("--models") + 1 :]:
                if word.startswith("-"):
                    break
                given.append(word)
            if given != list(names):
                problems.append(f"{name}: runs with --models {' '.join(given)}; MODEL_NAMES is {' '.join(names)}")

    dvcyaml = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((PROJECT_ROOT / PARAMS_FILE).read_text(encoding="utf-8"))
    for entry in dvcyaml.get("vars") or []:  # DVC merges params.yaml into the same namespace
        clash = set(entry) & set(params) if isinstance(entry, dict) else set()
        problems += [f"vars: `{key}` is also a {PARAMS_FILE} key (DVC refuses a list, merges a mapping)" for key in sorted(clash)]
    paths = {path for stage in stages.values() for path in stage_paths(stage) if not path.startswith(CODE_DIRS)}
    for plot in dvcyaml.get("plots") or []:  # top-level plots: `- path` or `- id: {y: {path: [...]}}`
        for plot_id, props in (plot.items() if isinstance(plot, dict) else [(plot, None)]):
            y = (props or {}).get("y")
            paths |= set(y) if isinstance(y, dict) else {plot_id}
    extra = ensemble_names()
    for template, filled in sorted(per_model_paths(paths, names).items()):
        missing, unknown = set(names) - filled, filled - set(names) - extra
        if missing or unknown:
            found = [missing and f"no entry for {sorted(missing)}", unknown and f"entries for {sorted(unknown)}, not in MODEL_NAMES"]
            problems.append(f"{template}: " + "; ".join(filter(None, found)))
    assert not problems, f"dvc.yaml per-model entries vs MODEL_NAMES {list(names)}:\n" + "\n".join(problems)


def test_stage_scripts_take_the_model_list_from_the_package():
    """stages/*.py default to tumorseg.models.MODEL_NAMES instead of spelling the models out."""
    names = set(model_names())
    literal = [
        f"{script.relative_to(PROJECT_ROOT)}:{node.lineno}: {node.value!r}"
        for script in sorted((PROJECT_ROOT / "stages").glob("*.py"))
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not literal, "model names written out in stage scripts (use MODEL_NAMES):\n" + "\n".join(literal)


# --------------------------------------------------------------------------------------------
# 4. DVC's model registry names every trained and every shipped model
# --------------------------------------------------------------------------------------------


def test_artifacts_name_every_trained_and_shipped_model(stages):
    from dvc.repo import Repo

    from tumorseg.config import MODEL_NAMES

    root = PROJECT_ROOT
    repo = Repo(str(root), uninitialized=True)
    try:
        artifacts = repo.artifacts.read()["dvc.yaml"]  # DVC's own parser: names and fields it accepts
    finally:
        repo.close()
    for name, artifact in artifacts.items():
        assert artifact.type == "model" and artifact.desc and artifact.labels, name
    trained_outs = {str(PurePosixPath(out.def_path)) for stage in stages.values() for out in stage.outs}
    for model in MODEL_NAMES:
        assert artifacts[model].path == f"models/{model}.keras" in trained_outs, model
    shipped = {path.stem: f"weights/{path.name}" for path in (root / "weights").glob("*.keras")}
    assert {name: artifacts[name].path for name in shipped if name in artifacts} == shipped, "every weights/*.keras is an artifact of its own name"
    assert set(artifacts) == set(MODEL_NAMES) | set(shipped)
