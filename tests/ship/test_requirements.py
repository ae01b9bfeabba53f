"""Every third-party module the release zip imports is installed by Home Assistant itself.

A user's Home Assistant has only its own dependencies plus what manifest.json "requirements" asks it to install
(docs/home-assistant.md §4.2). The project's venvs always had pydantic (the test plugin pulls it), so the release
imported it without declaring it and the config flow failed on a bare 2026.11.0 with "No module named 'pydantic'"
(issue 11). This scans the zip's sources with `ast` and resolves each import in the
line's venv: standard library, our own packages, a dependency homeassistant declares (its Requires-Dist, through
importlib.metadata), or a manifest requirement. tests/ship/test_bare_install.py proves the same on a real install.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions, requires, version
from pathlib import Path

import homeassistant  # HA aliases modules on import (2026.9+: probatio installs itself as voluptuous)
from homeassistant.util.package import is_installed
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT
from tests.ship.test_release_zip import release

OWN_PACKAGES = frozenset({"custom_components", "rkllm_engine", "rkllm_native", "rkllm_openai"})
IMPORT_ERRORS = frozenset({"ImportError", "ModuleNotFoundError"})
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})
MANIFEST = REPO_ROOT / "custom_components" / "rkllm" / "manifest.json"


@dataclass(frozen=True, slots=True)
class ImportSite:
    """Where a file imports third-party code; `options` are alternatives, each a set of modules needed together.

    A plain import has one option. `try: import a` / `except ImportError: import b` has two: either suffices.
    """

    path: str
    line: int
    options: tuple[tuple[str, ...], ...]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in IMPORT_ERRORS for name in names)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Top-level module names a file imports at run time (not under `if TYPE_CHECKING:`), per import site."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sites: list[ImportSite] = []

    def _modules(self, nodes: Iterable[ast.stmt]) -> tuple[str, ...]:
        collector = _Imports(self.path)
        for node in nodes:
            collector.visit(node)
        return tuple(sorted({module for site in collector.sites for option in site.options for module in option}))

    def _add(self, node: ast.AST, module: str | None) -> None:
        if module and not module.startswith("."):
            self.sites.append(ImportSite(self.path, getattr(node, "lineno", 0), ((module.split(".")[0],),)))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        handlers = [handler for handler in node.handlers if _catches_import_error(handler)]
        if not handlers:
            self.generic_visit(node)
            return
        primary = self._modules(node.body)
        fallback = self._modules(statement for handler in handlers for statement in handler.body)
        if primary and fallback:
            self.sites.append(ImportSite(self.path, node.lineno, (primary, fallback)))
        elif fallback:
            self.sites.append(ImportSite(self.path, node.lineno, (fallback,)))
        # primary imports without a fallback import are optional: the code runs without them.
        for handler in node.handlers:
            if handler not in handlers:
                self.visit(handler)
        for statement in (*node.orelse, *node.finalbody):
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            self._add(node, node.module)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in DYNAMIC_IMPORTERS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(node, first.value)
        self.generic_visit(node)


def import_sites(sources: Iterable[tuple[str, str]]) -> list[ImportSite]:
    """Third-party import sites of (name, Python source) pairs; stdlib and own packages are left out."""
    sites: list[ImportSite] = []
    for path, source in sources:
        collector = _Imports(path)
        collector.visit(ast.parse(source, filename=path))
        for site in collector.sites:
            options = tuple(
                option
                for option in (
                    tuple(m for m in option if m not in sys.stdlib_module_names and m not in OWN_PACKAGES)
                    for option in site.options
                )
            )
            if all(options):
                sites.append(ImportSite(site.path, site.line, options))
    return sites


def release_sources() -> list[tuple[str, str]]:
    """(name in the zip, source) of every Python file scripts/release.py packs."""
    return [
        (f"custom_components/rkllm/{item.target.as_posix()}", item.source.read_text(encoding="utf-8"))
        for item in release.collect_files(REPO_ROOT)
        if item.source.suffix == ".py"
    ]


def requirement_names(requirements: Iterable[str]) -> set[str]:
    """Canonical distribution names of requirement strings whose markers apply to this interpreter."""
    names: set[str] = set()
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(requirement.name))
    return names


def home_assistant_dependencies() -> set[str]:
    """The homeassistant distribution and those it declares (Requires-Dist) in this venv."""
    return {"homeassistant"} | requirement_names(requires("homeassistant") or [])


def manifest_requirements() -> list[str]:
    requirements: list[str] = json.loads(MANIFEST.read_text(encoding="utf-8"))["requirements"]
    return requirements


def providers(module: str) -> set[str] | None:
    """Distributions that provide `module` as it resolves here (after HA's aliases), or None if it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    locations = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    owners: set[str] = set()
    by_top_level = packages_distributions()
    for location in locations:
        if location is None or location in {"built-in", "frozen"}:
            continue
        path = Path(location).resolve()
        # The deepest sys.path entry holding it (site-packages, not the repository root above a venv).
        roots = [root for root in (Path(entry or ".").resolve() for entry in sys.path) if path.is_relative_to(root)]
        if roots:
            top = path.relative_to(max(roots, key=lambda root: len(root.parts))).parts[0]
            owners.update(canonicalize_name(name) for name in by_top_level.get(top.removesuffix(".py"), []))
    return owners or {canonicalize_name(name) for name in by_top_level.get(module, [])}


def undeclared_imports(sites: Iterable[ImportSite], allowed: set[str]) -> list[str]:
    """One message per import site no option of which is satisfied by `allowed` distributions."""
    problems: list[str] = []
    for site in sites:
        reasons: list[str] = []
        for option in site.options:
            missing = []
            for module in option:
                found = providers(module)
                if found is None:
                    missing.append(f"{module} (not installed)")
                elif not found & allowed:
                    missing.append(f"{module} (from {', '.join(sorted(found)) or 'an unknown distribution'})")
            if not missing:
                break
            reasons.append(", ".join(missing))
        else:
            problems.append(f"{site.path}:{site.line}: imports {' or '.join(reasons)}")
    return problems


def test_every_third_party_import_of_the_release_is_installed_by_home_assistant() -> None:
    sites = import_sites(release_sources())
    assert sites, "the scan found no third-party import at all (homeassistant at least)"
    allowed = home_assistant_dependencies() | requirement_names(manifest_requirements())
    problems = undeclared_imports(sites, allowed)
    assert problems == [], (
        f"neither a dependency of homeassistant {version('homeassistant')} nor in manifest.json requirements:\n"
        + "\n".join(problems)
    )


def test_the_scan_names_the_file_and_module_of_an_undeclared_import() -> None:
    sources = [
        ("custom_components/rkllm/api.py", "import json\nfrom pydantic import BaseModel\nfrom . import const\n"),
        (
            "custom_components/rkllm/compat.py",
            "import importlib\n"
            "try:\n    import probatio\nexcept ImportError:\n    import voluptuous_openapi\n"
            "try:\n    import orjson\nexcept ImportError:\n    orjson = None\n"
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mypy\n"
            "x = importlib.import_module('yaml')\n",
        ),
        ("custom_components/rkllm/vendor/rkllm_engine/a.py", "import rkllm_native.abi\nimport homeassistant\n"),
    ]
    sites = import_sites(sources)
    assert [(site.path.rsplit("/", 1)[1], site.line, site.options) for site in sites] == [
        ("api.py", 2, (("pydantic",),)),
        ("compat.py", 2, (("probatio",), ("voluptuous_openapi",))),
        ("compat.py", 13, (("yaml",),)),
        ("a.py", 2, (("homeassistant",),)),
    ]
    problems = undeclared_imports(sites, {"homeassistant"})
    assert problems[0] == "custom_components/rkllm/api.py:2: imports pydantic (from pydantic)"
    assert problems[1].startswith("custom_components/rkllm/compat.py:2: imports probatio ")
    assert problems[2] == "custom_components/rkllm/compat.py:13: imports yaml (from pyyaml)"
    assert len(problems) == 3


def test_requirements_agree_with_home_assistants_own_pins() -> None:
    # HA installs a requirement with its package_constraints.txt as a constraint: a requirement that excludes the
    # version HA pins could never install. Already satisfied here means HA would not reinstall it either.
    constraints = Path(homeassistant.__file__).parent / "package_constraints.txt"
    pins = {
        canonicalize_name(match.group(1)): match.group(2)
        for line in constraints.read_text(encoding="utf-8").splitlines()
        if (match := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*", line))
    }
    requirements = manifest_requirements()
    assert requirements, "manifest.json declares no requirement (pydantic is imported by rkllm_openai/schemas.py)"
    for text in requirements:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (
                f"{text!r} excludes {requirement.name}=={pinned}, which homeassistant {version('homeassistant')} "
                "pins in package_constraints.txt"
            )
        assert is_installed(text), f"{text!r} is not satisfied in this venv ({_installed(requirement.name)})"


def _installed(name: str) -> str:
    try:
        return f"{name} {distribution(name).version} installed"
    except PackageNotFoundError:
        return f"{name} not installed"
