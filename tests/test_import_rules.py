"""The package's import graph points one way and has no cycles, and its modules have one name each.

Entry points (the demo among them) -> train / sampling / evaluate -> data, diffusion, models,
parallel; below everything, `io` (files on disk) and `runtime` (errors, program caches, CPU
settings). `cli` (the commands' console) is imported only by modules that are commands. Every
import counts, also one inside a function (a function-level import hides a cycle; it does not
remove it).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pixeldance_jax"

ROOMS = {"aot", "cli", "convert", "data", "demo", "diffusion", "evaluate", "io", "models",
         "parallel", "runtime", "sampling", "train"}
# Room -> rooms it must never import.
FORBIDDEN = {
    "runtime": ROOMS - {"runtime"},
    "io": ROOMS - {"io", "runtime"},
    "cli": ROOMS - {"cli", "runtime"},
    "models": {"train", "data", "sampling", "evaluate", "demo", "aot", "convert", "io", "cli"},
    "diffusion": {"models", "train", "data", "sampling", "evaluate", "demo", "aot", "convert",
                  "io", "cli"},
    "data": {"models", "train", "sampling", "evaluate", "demo", "aot", "convert"},
    "parallel": {"models", "train", "data", "sampling", "evaluate", "demo", "aot", "convert",
                 "io", "cli"},
    # Pretrained weights into parameter trees: models and files, never training or data.
    "convert": {"train", "data", "sampling", "demo", "aot"},
    "sampling": {"train", "evaluate", "demo", "aot", "convert"},
    "train": {"demo", "aot", "convert"},
    "evaluate": {"demo", "aot"},
    # The demo is an entry point over sampling: it never needs training code.
    "demo": {"train", "aot"},
    # The ahead-of-time compiler is an entry point over train and sampling.
    "aot": {"demo", "evaluate"},
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, node: ast.AST) -> list[str]:
  """Dotted names an import statement may refer to (a module, or a name inside one)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      package = module.split(".")[:-node.level]
      base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]
  return []


def _import_graph() -> dict[str, set[str]]:
  modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
  graph = {}
  for module, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets.update(t for t in _imported(module, node) if t in modules and t != module)
    graph[module] = targets
  return graph


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for neighbour in graph[node]:
      if neighbour not in index:
        visit(neighbour)
        low[node] = min(low[node], low[neighbour])
      elif neighbour in on_stack:
        low[node] = min(low[node], index[neighbour])
    if low[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_the_checker_sees_function_level_imports_and_cycles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
  tree = ast.parse("def f():\n  from pixeldance_jax.train import trainer\n")
  imports = [t for node in ast.walk(tree) for t in _imported("pixeldance_jax.data.x", node)]
  assert "pixeldance_jax.train.trainer" in imports


def test_no_import_cycles():
  assert _cycles(_import_graph()) == []


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_one_way(room):
  broken = [f"{module} -> {target}"
            for module, targets in sorted(_import_graph().items()) if _room(module) == room
            for target in sorted(targets) if _room(target) in FORBIDDEN[room]]
  assert broken == []


_SIDE_EFFECTS = """
import importlib, importlib.util, json, os, pkgutil
import jax
# What the libraries the package uses do on import is theirs (tensorboardX sets CRC32C_SW_MODE).
import av, flax, grain, optax, orbax.checkpoint, tensorboardX, tensorflow_datasets
lower = lambda: jax.jit(lambda k: jax.random.bits(k, (4,))).lower(jax.random.key(0)).as_text()
before = (lower(), dict(os.environ), jax.config.values.copy())
import pixeldance_jax
for module in pkgutil.walk_packages(pixeldance_jax.__path__, "pixeldance_jax."):
  source = importlib.util.find_spec(module.name).loader.get_source(module.name) or ""
  if "DEFINE_" not in source:  # Command-line modules define absl flags: one per process.
    importlib.import_module(module.name)
after = (lower(), dict(os.environ), jax.config.values.copy())
print(json.dumps([name for name, b, a in zip(("lowering", "environment", "jax.config"), before,
                                             after) if b != a]))
"""


def test_importing_the_package_changes_nothing_in_jax():
  """CPU settings (the random-bit hash's lowering, malloc, libtpu's environment) are the
  commands' to apply (console.run), not an import's: every library module imported, JAX lowers
  as before and sees the same environment and config."""
  import json  # pylint: disable=import-outside-toplevel
  import processes  # pylint: disable=import-outside-toplevel
  result = processes.run_python("-c", _SIDE_EFFECTS)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_module_is_in_a_room():
  loose = sorted(module for module in _import_graph() if module.count(".") == 1
                 and _room(module) not in ROOMS)
  assert loose == []


def test_only_commands_import_the_console():
  """Library code raises (`runtime.errors`); printing and exit codes belong to the commands."""
  commands = []
  for module, targets in sorted(_import_graph().items()):
    if any(_room(target) == "cli" for target in targets) and _room(module) != "cli":
      path = PACKAGE.parent.joinpath(*module.split("."))
      source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
      if not (module.endswith("__main__") or 'if __name__ == "__main__":' in source):
        commands.append(module)
  assert commands == []


def test_no_two_modules_share_a_name():
  names = {}
  for path in PACKAGE.rglob("*.py"):
    if path.stem not in ("__init__", "__main__"):
      names.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
  assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
