"""One home per heavy dependency, rooms that import only downward, and the package installs under
`innerloop.*` (see DESIGN.md and the README's "How it works").

Imports are read with `ast`, not by importing, so the check is fast and sees imports inside functions;
rules about what a module may reach are checked on the transitive closure of those imports (a function
that imports something counts as if it ran), and the "loads no Ray" rules also by really importing.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "learners", "distributed")  # folder name == innerloop.<name>
SOURCES = sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))

# The shared vocabulary at the top of distributed/: every room imports it, it imports no room.
VOCABULARY = {"config", "config_base", "config_extras", "config_rollout", "config_tasks", "config_load", "records", "errors", "stacks", "transfer"}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["innerloop", *parts])


def imported_modules(path: Path) -> set[str]:
    """Absolute dotted names of every module `path` imports, anywhere in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from innerloop import learners` imports the subpackage: count it as such.
            found.update(f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


IMPORTS = {rel(p): imported_modules(p) for p in SOURCES}


def importers_of(top: str) -> set[str]:
    return {f for f, mods in IMPORTS.items() if any(m == top or m.startswith(top + ".") for m in mods)}


FILES = {module_name(p): rel(p) for p in SOURCES}  # innerloop.x.y -> x/y.py (packages -> __init__.py)


def reachable(start: str) -> set[str]:
    """Every source file `start` (a file) reaches through innerloop imports, itself included."""
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [FILES[m] for m in IMPORTS[current] if m in FILES]
    return seen


def test_reachable_follows_imports_through_other_modules():
    assert "distributed/records.py" in reachable("actors/rollout.py")
    chain = reachable("distributed/cli.py")
    assert "learners/grpo.py" in chain and "actors/tasks.py" in chain  # cli -> run/... -> both planes


def test_sources_found():
    assert "actors/rollout.py" in IMPORTS and "learners/grpo.py" in IMPORTS and "distributed/cluster/placement.py" in IMPORTS


def test_imported_modules_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    # The checker itself: imports inside functions and relative imports must not slip past it.
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    folder = tmp_path / "actors"
    folder.mkdir()
    probe = folder / "probe.py"
    probe.write_text("def f():\n    import vllm.config\n    from ..learners import grpo\n    from . import tasks\n")
    assert {"vllm.config", "innerloop.learners", "innerloop.learners.grpo", "innerloop.actors.tasks"} <= \
        imported_modules(probe)


def test_vllm_only_in_the_rollout_worker():
    # weight_loading.py runs inside vLLM's worker process, but vLLM imports it, not the other way round;
    # weight_transfer.py is the engine's end of the streamed sync, a backend registered with vLLM there.
    assert importers_of("vllm") == {"actors/rollout.py", "actors/weight_transfer.py"}


def test_the_learner_reaches_no_vllm_for_the_streamed_sync():
    reached = {f for f in reachable("learners/learner.py") if "vllm" in {m.split(".")[0] for m in IMPORTS[f]}}
    assert not reached and "distributed/transfer.py" in reachable("learners/learner.py")


def test_deepspeed_only_in_the_learner():
    assert importers_of("deepspeed") == {"learners/learner.py"}


def test_peft_only_in_the_lora_module():
    # learner.lora's adapters: the learner wraps its model there; the start checks ask it about targets.
    assert importers_of("peft") == {"learners/lora.py"}


def test_ray_only_in_the_cluster_room():
    users = importers_of("ray")
    assert "distributed/cluster/placement.py" in users
    outside = {f for f in users if not f.startswith("distributed/cluster/")}
    assert not outside, f"ray imported outside distributed/cluster/: {sorted(outside)}"


def test_matplotlib_only_in_the_lens():
    outside = {f for f in importers_of("matplotlib") if not f.startswith("distributed/lens/")}
    assert not outside, f"matplotlib imported outside distributed/lens/: {sorted(outside)}"


RAY_FREE = ["learners/grpo.py", "learners/learner.py", "actors/rollout.py",
            *sorted(f for f in IMPORTS if f.startswith("distributed/lens/"))]


@pytest.mark.parametrize("start", RAY_FREE)
def test_roles_math_and_lens_reach_no_ray(start):
    ray_users = importers_of("ray")
    reached = sorted(reachable(start) & ray_users)
    assert not reached, f"{start} reaches Ray through {reached}"


def test_importing_loads_no_ray_and_no_other_plane():
    """Really imported, each in a fresh interpreter (all at once: each pays for torch's import)."""
    modules = ["innerloop.learners.grpo", "innerloop.learners.learner", "innerloop.actors.rollout",
               "innerloop.distributed.lens.report"]
    running = {}
    for module in modules:
        other = "innerloop.learners." if ".actors." in module else "innerloop.actors."
        code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' "
                f"or m.startswith('{other}')))")
        running[module] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for module, process in running.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and out.strip().splitlines()[-1] == "[]", f"importing {module} loaded {out}"


@pytest.mark.parametrize("name", sorted(VOCABULARY))
def test_the_shared_vocabulary_reaches_no_room(name):
    reached = {f for f in reachable(f"distributed/{name}.py") if f != f"distributed/{name}.py"}
    allowed = {f"distributed/{v}.py" for v in VOCABULARY}
    assert reached <= allowed, f"distributed/{name}.py reaches {sorted(reached - allowed)}"


def ray_remote_uses(path: Path) -> list[int]:
    """Lines that reach `ray.remote` (through `import ray [as x]` or `from ray import remote`)."""
    tree = ast.parse(path.read_text())
    ray_names = {"ray"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ray_names.update(a.asname for a in node.names if a.name == "ray" and a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "ray":
            lines += [node.lineno for a in node.names if a.name == "remote"]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "remote"
                and isinstance(node.value, ast.Name) and node.value.id in ray_names):
            lines.append(node.lineno)
    return lines


def unbounded_ray_waits(path: Path) -> list[int]:
    """Lines calling ray.get or ray.wait without a `timeout=` keyword."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "wait")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                and not any(k.arg == "timeout" for k in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_unbounded_ray_waits_are_found(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import ray\nray.get(x)\nray.get(x, timeout=1)\nray.wait(xs, timeout=t)\nray.wait(xs)\n")
    assert unbounded_ray_waits(source) == [2, 5]


def test_no_remote_call_is_waited_on_without_a_bound():
    """A hung actor must end in a clear error, never in a job that hangs: every wait has a timeout."""
    unbounded = {rel(p): lines for p in SOURCES if (lines := unbounded_ray_waits(p))}
    assert not unbounded, f"ray.get/ray.wait without timeout=: {unbounded}"


def test_ray_remote_only_in_placement():
    uses = {rel(p): ray_remote_uses(p) for p in SOURCES}
    assert uses["distributed/cluster/placement.py"], "placement.py is ray.remote's home but no longer uses it"
    elsewhere = {f: lines for f, lines in uses.items() if lines and f != "distributed/cluster/placement.py"}
    assert not elsewhere, f"ray.remote outside distributed/cluster/placement.py: {elsewhere}"


@pytest.mark.parametrize("folder, other", [("actors", "learners"), ("learners", "actors")])
def test_actors_and_learners_never_reach_each_other(folder, other):
    offenders = {f: sorted(g for g in reachable(f) if g.startswith(other + "/"))
                 for f in IMPORTS if f.startswith(folder + "/")}
    offenders = {f: via for f, via in offenders.items() if via}
    assert not offenders, f"{folder}/ reaches {other}/: {offenders}"


def test_rooms_exist_and_hold_their_jobs():
    rooms = {p.name for p in (ROOT / "distributed").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == {"run", "cluster", "state", "lens"}
    top = {p.stem for p in (ROOT / "distributed").glob("*.py")} - {"__init__"}
    assert top == VOCABULARY | {"cli"}, f"distributed/ top level holds {sorted(top)}"


def test_grpo_math_imports_only_torch_and_stdlib():
    tops = {m.split(".")[0] for m in IMPORTS["learners/grpo.py"]}
    allowed = set(sys.stdlib_module_names) | {"torch"}
    assert tops <= allowed, f"learners/grpo.py imports {sorted(tops - allowed)}"
    assert "torch" in tops


@pytest.mark.parametrize("name", [f"innerloop.{p}" for p in PACKAGES])
def test_package_installs_under_innerloop(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not importable; reinstall with `pip install -e .`"
    folder = name.rpartition(".")[2]
    assert Path(spec.origin).resolve() == ROOT / folder / "__init__.py"


def test_console_script_in_the_venv():
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a link into the base install
    script = shutil.which("innerloop", path=str(bin_dir))
    assert script is not None, f"no `innerloop` script in {bin_dir}; reinstall with `pip install -e .`"
    [entry] = importlib.metadata.entry_points(group="console_scripts", name="innerloop")
    assert entry.value == "innerloop.distributed.cli:main"
    assert callable(entry.load())
