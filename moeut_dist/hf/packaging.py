"""The Python files of an exported directory: our own modules, imports rewritten.

transformers loads a directory's code (`trust_remote_code=True`) as one flat package of modules
and copies along only what the entry modules import relatively, `from .module import name`. So
every `moeut_dist` module the wrappers need, found by following their imports, becomes a flat
file (`moeut_dist.model.attention` → `moeut_model_attention.py`) whose `from moeut_dist.x import
name` lines read `from .moeut_x import name`. Nothing is copied by hand: what the directory runs is
what this checkout runs. `moeut_dist.kernels` is the one substitution (`remote_kernels`: the
PyTorch path, without Triton).

Imports must therefore name what they take from a module (`from moeut_dist.kernels import
moe_mlp`, not `from moeut_dist import kernels`): anything else is refused here, by name.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = "moeut_dist"
ENTRY_MODULES = {  # module → file name, fixed by the config's `auto_map`
    "moeut_dist.hf.configuration_moeut": "configuration_moeut",
    "moeut_dist.hf.modeling_moeut": "modeling_moeut",
}
SUBSTITUTES = {"moeut_dist.kernels": "moeut_dist.hf.remote_kernels"}


class PackagingError(RuntimeError):
    """Model code that cannot be packaged (a bug in this checkout, not bad user input)."""


def flat_name(module: str) -> str:
    if module in ENTRY_MODULES:
        return ENTRY_MODULES[module]
    return "moeut_" + module.removeprefix(PACKAGE + ".").replace(".", "_")


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(SUBSTITUTES.get(module, module))
    if spec is None or spec.origin is None:
        raise PackagingError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _our_imports(tree: ast.Module, module: str) -> list[ast.ImportFrom]:
    """The statements importing from `moeut_dist`, each checked to be `from module import name`
    of a module (not a module imported from a package)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            alias.name.split(".")[0] == PACKAGE for alias in node.names
        ):
            raise PackagingError(f"{module}: line {node.lineno} imports a moeut_dist module")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            if node.level:
                raise PackagingError(f"{module}: line {node.lineno} is a relative import")
            for alias in node.names:
                if _is_package(node.module) and importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ):
                    raise PackagingError(
                        f"{module}: line {node.lineno} imports the module {node.module}."
                        f"{alias.name}; import the names it needs from it"
                    )
            found.append(node)
    return found


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _rewrite(source: str, imports: list[ast.ImportFrom]) -> str:
    lines = source.splitlines(keepends=True)
    for node in sorted(imports, key=lambda n: n.lineno, reverse=True):
        names = ", ".join(
            alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
            for alias in node.names
        )
        indent = " " * node.col_offset
        statement = f"{indent}from .{flat_name(node.module)} import {names}\n"
        lines[node.lineno - 1 : node.end_lineno] = [statement]
    return "".join(lines)


def package_sources() -> dict[str, str]:
    """File name → source of every module the wrappers need, imports rewritten."""
    files: dict[str, str] = {}
    pending = list(ENTRY_MODULES)
    done: set[str] = set()
    while pending:
        module = pending.pop()
        if module in done:
            continue
        done.add(module)
        source = _source_path(module).read_text()
        imports = _our_imports(ast.parse(source), module)
        pending += [node.module for node in imports]
        header = (
            f"# {module} of moeut-dist, packaged for transformers (moeut_dist/hf/packaging.py)\n"
        )
        files[f"{flat_name(module)}.py"] = header + _rewrite(source, imports)
    return files


def write_sources(directory: Path) -> list[str]:
    """Write the packaged modules into `directory`; returns their file names."""
    files = package_sources()
    for name, source in files.items():
        (directory / name).write_text(source)
    return sorted(files)
