"""The package's import rules (.importlinter): layers import only downward, no cycles.

`lint-imports` (import-linter) checks the layer and independence contracts, counting imports
inside function bodies; the cycle check below reads every import statement of every module with
`ast` (a cycle through a package's __init__ counts too).
"""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dlm_jax")


def _modules() -> dict[str, str]:
  mods = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
        mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return mods


def _edges(mods: dict[str, str]) -> dict[str, set[str]]:
  edges = {m: set() for m in mods}
  for cur, path in mods.items():
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Import):
        targets = {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          pkg = cur if is_pkg else cur.rsplit(".", 1)[0]
          for _ in range(node.level - 1):
            pkg = pkg.rsplit(".", 1)[0]
          base = pkg + ("." + base if base else "")
        targets = {base} | {f"{base}.{a.name}" for a in node.names}
      else:
        continue
      edges[cur] |= {t for t in targets
                     if t in mods and t != cur and not t.startswith(cur + ".")}
  return edges


def test_no_import_cycles():
  edges = _edges(_modules())

  def reach(start):
    seen, todo = set(), [start]
    while todo:
      for nxt in edges[todo.pop()]:
        if nxt not in seen:
          seen.add(nxt)
          todo.append(nxt)
    return seen

  cyclic = sorted(m for m in edges if m in reach(m))
  assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_layer_contracts_hold():
  exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which(
      "lint-imports")
  if exe is None:
    pytest.fail("lint-imports (import-linter) is not installed; it is in the [dev] extra.")
  r = subprocess.run([exe, "--config", os.path.join(ROOT, ".importlinter")], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
