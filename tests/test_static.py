"""Static checks of the code base: public names import, no verb named by a string, no driver
setting DeepSpeed or vLLM variables for its workers, no two test modules sharing a basename."""

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("colocate", "placement", "weight_sync")

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_imports(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert missing == []


def _python_files(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _verbs() -> set[str]:
    from colocate.core.contract import EngineTenant, TrainerTenant, verbs_of
    from weight_sync.receiver import WeightSyncWorkerExtension

    ext = {n for n in vars(WeightSyncWorkerExtension) if n.startswith("ws_")}
    return set(verbs_of(EngineTenant)) | set(verbs_of(TrainerTenant)) | ext


_DISPATCH = {"getattr", "collective_rpc", "remote", "Call", "call", "engine_call", "trainer_call"}


def test_no_actor_verb_is_named_by_a_string_in_colocate():
    """No verb (contract method or worker-extension method) is dispatched by a string literal.

    Span names and tags that read like verbs ("generate", "start") are fine; a string verb in
    a dispatching position (getattr, collective_rpc, a Ray ``.remote``, a ``Call``) is not.
    """
    verbs = _verbs()
    found = []
    for path in _python_files("colocate"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in _DISPATCH:
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Constant) and arg.value in verbs:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {arg.value!r}")
    assert found == []


def test_the_static_check_would_see_a_string_verb(tmp_path):
    """The check above is not vacuous: the patterns it looks for are found in such code."""
    code = 'getattr(h, "sleep").remote(1)\nllm.collective_rpc("ws_receive")\n'
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]
    hits = [
        a.value
        for n in calls
        if (n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id) in _DISPATCH
        for a in n.args
        if isinstance(a, ast.Constant) and a.value in _verbs()
    ]
    assert sorted(hits) == ["sleep", "ws_receive"]


def _sets_worker_variable(node) -> str | None:
    """The DeepSpeed/vLLM variable a statement sets in the process environment, if any."""
    for const in ast.walk(node):
        if isinstance(const, ast.Constant) and isinstance(const.value, str):
            if const.value.startswith(("DS_", "VLLM_")):
                return const.value
    return None


def test_no_driver_sets_deepspeed_or_vllm_variables_for_its_workers():
    found = []
    for path in _python_files("examples", "benchmarks", "tests"):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            env_write = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("setdefault", "update", "__setitem__")
                and "environ" in ast.unparse(node.func.value)
            ) or (
                isinstance(node, ast.Assign)
                and any("environ" in ast.unparse(t) for t in node.targets)
            )
            runtime_env = isinstance(node, ast.keyword) and node.arg == "runtime_env"
            if (env_write or runtime_env) and (name := _sets_worker_variable(node)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert found == []


def _basename_collisions(tests: Path) -> dict[str, list[str]]:
    """Module basenames that more than one file under ``tests`` carries, with those files.

    The test folders are not packages (the conftests import ``raysupport`` and the tests
    ``fakes`` by their bare names), so pytest imports every module by its basename: two
    ``test_ppo.py`` break collection, and a second ``fakes.py`` would silently shadow the
    first. ``conftest.py`` is the exception pytest itself keeps apart.
    """
    where = defaultdict(list)
    for path in sorted(tests.rglob("*.py")):
        if path.name != "conftest.py":
            where[path.name].append(str(path.relative_to(tests)))
    return {name: paths for name, paths in where.items() if len(paths) > 1}


def test_no_two_modules_under_tests_share_a_basename():
    assert _basename_collisions(ROOT / "tests") == {}


def test_the_basename_check_would_see_a_collision(tmp_path):
    """The check above is not vacuous: two ``test_ppo.py`` in different folders are found."""
    for rel in ("conftest.py", "a/conftest.py", "a/test_ppo.py", "b/test_ppo.py", "b/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert _basename_collisions(tmp_path) == {"test_ppo.py": ["a/test_ppo.py", "b/test_ppo.py"]}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports, at module level or inside a function."""
    modules = {}
    for path in _python_files(*PACKAGES):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def resolve(target: str) -> str:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] in PACKAGES and (m := resolve(t)) and m != name:
                    graph[name].add(m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_module_level_or_lazy():
    """No two modules import each other, directly or round a circle, even inside a function."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_would_see_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_subpackage_says_what_it_holds_in_one_sentence():
    """A newcomer finds a concept's module from the package names and their docstrings."""
    for init in sorted((ROOT / "colocate").glob("*/**/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, init
        summary = doc.split("\n\n")[0]
        assert ". " not in summary and summary.endswith("."), (init, summary)


def test_no_constructor_takes_more_than_six_parameters():
    """Wide constructors wired by hand are how a god object grows back (frozen configs and
    dataclasses group what belongs together instead)."""
    wide = []
    for path in _python_files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                args = node.args
                count = len(args.args) - 1 + len(args.kwonlyargs)  # without self
                if count > 6:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} ({count})")
    assert wide == []


def test_the_coordinator_stays_thin():
    assert len((ROOT / "colocate/core/coordinator.py").read_text().splitlines()) <= 350
