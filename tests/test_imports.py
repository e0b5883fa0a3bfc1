"""Which way imports run, read from the source with `ast`, not by importing it.

- `cvolution_jax/data/` never imports `cvolution_jax.detection`, `.train` or `.models`, and its modules
  never import each other in a circle, at module level or inside a function;
- `cvolution_jax/train/` (the runner) imports no task's module (`cvolution_jax.tasks.<task>`) and no model
  package, only the registry that names the tasks;
- the model packages (`models`, `necks`, `detection`, `segmentation`) import neither the runner nor a
  task, and segmentation nothing of detection;
- `kernels/` imports neither `cvolution_jax` nor `experiments`;
- grain's worker processes unpickle the COCO preprocessing without jax.
"""

import ast
import os
import pickle
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_statements(path: str) -> list[tuple[str, list[str]]]:
    """Every import in `path`, anywhere in it (functions too), as `(module, names)` with absolute
    dotted names: `import a.b` is `("a.b", [])`, `from a import b, c` is `("a", ["b", "c"])`."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def imported_modules(path: str) -> set[str]:
    """Every module `path` imports, anywhere in it; `from package import name` counts as
    `package.name` as well, since `name` may be a module."""
    return {found for base, names in import_statements(path) for found in (base, *(f"{base}.{n}" for n in names))}


def module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def import_cycles(folder: str) -> list[list[str]]:
    """The groups of modules under `folder` that import each other in a circle (each group sorted),
    counting imports inside functions. `from package import sub` imports the module `sub`, not
    the package's `__init__`, when `sub` is one of the modules."""
    paths = modules_under(folder)
    modules = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        targets = set()
        for base, names in import_statements(path):
            targets.update(f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names or [None])
        graph[module_name(path)] = (targets & modules) - {module_name(path)}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reach = {module: reachable(module) for module in graph}
    groups = {tuple(sorted(m for m in reach[module] if module in reach[m])) for module in graph if module in reach[module]}
    return sorted(list(group) for group in groups)


def modules_under(folder: str) -> list[str]:
    return sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(os.path.join(ROOT, folder))
                  for name in names if name.endswith(".py"))


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{os.path.relpath(path, ROOT)} imports {module}" for path in modules_under(folder)
            for module in sorted(imported_modules(path))
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_the_reader_resolves_absolute_relative_and_nested_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    source = tmp_path / "pkg" / "sub" / "mod.py"
    source.write_text("import a.b\nfrom c import d\nfrom . import e\nfrom ..f import g\n"
                      "def late():\n    import h\n")
    assert imported_modules(str(source)) == {"a.b", "c", "c.d", "pkg.sub", "pkg.sub.e", "pkg.f", "pkg.f.g", "h"}
    assert violations("pkg", ("c",)) == ["pkg/sub/mod.py imports c", "pkg/sub/mod.py imports c.d"]
    assert violations("pkg", ("a.b.c", "pkg.fx")) == []  # a prefix of a name is not the package


def test_the_cycle_finder_sees_lazy_imports_and_tells_submodules_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg import a\n")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("import numpy\ndef late():\n    from pkg.a import thing\n")
    (tmp_path / "pkg" / "c.py").write_text("from . import b\n")
    assert import_cycles("pkg") == [["pkg.a", "pkg.b"]]  # pkg.c -> b and pkg -> a are no cycle
    (tmp_path / "pkg" / "b.py").write_text("import numpy\n")
    assert import_cycles("pkg") == []
    (tmp_path / "pkg" / "b.py").write_text("from pkg import VERSION\n")  # a name of the package itself
    assert import_cycles("pkg") == [["pkg", "pkg.a", "pkg.b"]]


def test_data_modules_import_each_other_in_no_circle():
    assert len(modules_under("cvolution_jax/data")) > 10
    assert import_cycles("cvolution_jax/data") == []


def test_data_imports_no_detection_training_or_models():
    forbidden = ("cvolution_jax.detection", "cvolution_jax.train", "cvolution_jax.models", "cvolution_jax.tasks")
    assert modules_under("cvolution_jax/data")
    assert violations("cvolution_jax/data", forbidden) == []


def test_the_runner_imports_no_task():
    """The runner may read the registry of tasks (`cvolution_jax.tasks`: names to modules, each
    imported when asked for by name), never a task's module."""
    task_modules = tuple(f"cvolution_jax.tasks.{os.path.basename(path)[:-3]}" for path in modules_under("cvolution_jax/tasks")
                         if not path.endswith("__init__.py"))
    assert "cvolution_jax.tasks.detection" in task_modules
    forbidden = (*task_modules, "cvolution_jax.detection", "cvolution_jax.segmentation", "cvolution_jax.necks",
                 "cvolution_jax.models", "experiments")
    assert modules_under("cvolution_jax/train")
    assert violations("cvolution_jax/train", forbidden) == []
    assert not imported_modules(os.path.join(ROOT, "cvolution_jax", "tasks", "__init__.py")) & set(task_modules)


@pytest.mark.parametrize("package", ["cvolution_jax/models", "cvolution_jax/necks", "cvolution_jax/detection",
                                     "cvolution_jax/segmentation"])
def test_models_and_their_parts_import_neither_the_runner_nor_a_task(package):
    """A model package is a library of modules: the runner and the tasks use it, never the other way.
    Segmentation shares the FPN through `necks`, not through detection."""
    assert modules_under(package)
    forbidden = ("cvolution_jax.train", "cvolution_jax.tasks", "experiments")
    if package != "cvolution_jax/detection":
        forbidden += ("cvolution_jax.detection",)
    assert violations(package, forbidden) == []


def test_kernels_import_neither_the_package_nor_the_experiments():
    assert modules_under("kernels")
    assert violations("kernels", ("cvolution_jax", "experiments")) == []


def test_the_library_never_imports_the_experiments():
    assert violations("cvolution_jax", ("experiments",)) == []


def test_a_grain_worker_unpickles_and_runs_the_coco_preprocessing_without_jax(tmp_path):
    """The worker side of a COCO pipeline in a process where `import jax` fails: unpickling the
    preprocessing and running it on a record needs nothing of jax. (grain itself tries to import
    jax for its profiler and carries on without it.)"""
    from cvolution_jax.data import coco, coco_transforms, shapes

    paths = shapes.write_shapes(tmp_path, num_train=1, num_val=1, image_size=32)
    record = coco.load_coco(**paths["val"]).records[0]
    preprocess = coco_transforms.Preprocess(scale=(32, 32), buckets=((32, 32),), max_gt=8, mask_size=8)
    expected = preprocess(record, None)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((preprocess, record)))
    child = ("import pickle, sys\n"
             "sys.modules['jax'] = None  # any import of jax now raises ImportError\n"
             f"preprocess, record = pickle.loads(open({str(tmp_path / 'job.pkl')!r}, 'rb').read())\n"
             "example = preprocess(record, None)\n"
             f"pickle.dump(example, open({str(tmp_path / 'out.pkl')!r}, 'wb'))\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    example = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert set(example) == set(expected) and example["masks"].any()
    for key, value in expected.items():
        assert (example[key] == value).all(), key


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
