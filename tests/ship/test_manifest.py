"""HACS and hassfest rules (docs/home-assistant.md §4.2-4.4) that decide whether the integration installs and loads.

hassfest and the HACS action run in CI on GitHub only; these tests check the same rules offline, so a
manifest, translation or dependency mistake fails here first.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import zlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import homeassistant.components
from awesomeversion import AwesomeVersion, AwesomeVersionStrategy
from homeassistant.const import Platform

from tests.conftest import REPO_ROOT

INTEGRATION = REPO_ROOT / "custom_components" / "rkllm"
HACS_KEYS = {
    "name",
    "content_in_root",
    "zip_release",
    "filename",
    "hide_default_branch",
    "country",
    "homeassistant",
    "hacs",
    "persistent_directory",
    "render_readme",
}
IOT_CLASSES = {
    "assumed_state",
    "calculated",
    "cloud_polling",
    "cloud_push",
    "local_polling",
    "local_push",
}
# hassfest: integrations any integration may import without listing them (script/hassfest/dependencies.py),
# plus every entity platform domain.
ALWAYS_ALLOWED = {
    *(platform.value for platform in Platform),
    "alert",
    "automation",
    "conversation",
    "default_config",
    "device_automation",
    "frontend",
    "group",
    "homeassistant",
    "input_boolean",
    "input_button",
    "input_datetime",
    "input_number",
    "input_select",
    "input_text",
    "media_source",
    "onboarding",
    "panel_custom",
    "persistent_notification",
    "person",
    "script",
    "shopping_list",
    "sun",
    "system_health",
    "system_log",
    "timer",
    "webhook",
    "websocket_api",
    "zone",
    "mjpeg",
    "stream",
}
HA_INTEGRATIONS = {
    path.name
    for path in Path(homeassistant.components.__file__).parent.iterdir()
    if path.is_dir() and (path / "manifest.json").is_file()
}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def manifest() -> dict[str, Any]:
    content: dict[str, Any] = read_json(INTEGRATION / "manifest.json")
    return content


# ---------------------------------------------------------------------------------------------------------------
# hacs.json
# ---------------------------------------------------------------------------------------------------------------


def test_hacs_json_names_the_integration_and_the_oldest_supported_release() -> None:
    hacs = read_json(REPO_ROOT / "hacs.json")
    assert set(hacs) <= HACS_KEYS, f"unknown hacs.json keys: {sorted(set(hacs) - HACS_KEYS)}"
    assert hacs["name"] == "RKLLM"
    assert hacs["homeassistant"] == "2025.4.0"
    assert AwesomeVersion(hacs["homeassistant"]).strategy == AwesomeVersionStrategy.CALVER


def test_hacs_installs_the_release_zip_that_carries_the_vendored_packages() -> None:
    # Without zip_release HACS copies custom_components/rkllm from the repository, which lacks rkllm_native and
    # rkllm_engine (they live at the repository root and are not on PyPI): the integration would not import.
    hacs = read_json(REPO_ROOT / "hacs.json")
    assert hacs.get("zip_release") is True, 'hacs.json needs "zip_release": true (the asset of scripts/build_release)'
    assert hacs.get("filename") == "rkllm.zip", 'hacs.json "filename" must name the asset scripts/build_release writes'


# ---------------------------------------------------------------------------------------------------------------
# manifest.json
# ---------------------------------------------------------------------------------------------------------------


def test_manifest_keys_are_sorted_domain_name_then_alphabetical() -> None:
    keys = list(manifest())
    assert keys[:2] == ["domain", "name"]
    assert keys[2:] == sorted(keys[2:]), "hassfest: Manifest keys are not sorted correctly"


def test_manifest_has_what_hassfest_and_hacs_require() -> None:
    content = manifest()
    assert content["domain"] == INTEGRATION.name
    assert content["name"]
    assert re.match(r"^https://", content["documentation"])
    assert "www.home-assistant.io/integrations/" not in content["documentation"]
    assert re.match(r"^https://\S+$", content["issue_tracker"])
    assert content["codeowners"]
    assert all(re.match(r"^@[\w.-]+(/[\w.-]+)?$", owner) for owner in content["codeowners"])
    assert content["iot_class"] in IOT_CLASSES
    assert content["integration_type"] == "service"
    assert AwesomeVersion(content["version"]).strategy != AwesomeVersionStrategy.UNKNOWN
    assert content["config_flow"] is True
    assert (INTEGRATION / "config_flow.py").is_file()
    # quality_scale is a core-only tier marker; hassfest rejects it in custom manifests (§4.2).
    assert "quality_scale" not in content
    assert "homeassistant" not in content, "the minimum HA version belongs in hacs.json"


def test_manifest_version_is_the_project_version() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    assert match is not None
    assert manifest()["version"] == match.group(1)


def test_dependencies_include_conversation_and_http_and_exist() -> None:
    content = manifest()
    dependencies = set(content.get("dependencies", []))
    after = set(content.get("after_dependencies", []))
    assert {"conversation", "http"} <= dependencies
    assert not dependencies & after, "a domain is both in dependencies and after_dependencies"
    assert dependencies | after <= HA_INTEGRATIONS


def test_requirements_are_pure_python_packages_from_pypi_with_version_ranges() -> None:
    # hassfest lets a custom integration use any specifier but no space (script/hassfest/requirements.py); a range,
    # not a pin, because HA installs requirements under its own package_constraints.txt, whose pin of a package
    # such as pydantic changes from release to release (tests/ship/test_requirements.py checks each line's pin).
    # On HA OS/Container requirements come from the musllinux wheel index: only pure-Python packages are safe.
    for requirement in manifest()["requirements"]:
        match = re.fullmatch(
            r"([A-Za-z0-9][A-Za-z0-9._-]*)((?:(?:==|>=|<=|~=|!=|<|>)[0-9][0-9A-Za-z.*+!-]*,?)+)", requirement
        )
        assert match, f"{requirement!r}: requirements must be 'name<specifiers>' from PyPI (no URL, path or space)"
        assert not match.group(2).endswith(","), requirement
        assert "==" not in match.group(2), f"{requirement!r}: a pin fights HA's package_constraints.txt; use a range"
        try:
            files = distribution(match.group(1)).files or []
        except PackageNotFoundError:
            raise AssertionError(f"{requirement!r} is not installed in the test venv (see requirements/)") from None
        compiled = [str(file) for file in files if file.suffix in {".so", ".pyd", ".dylib"}]
        assert compiled == [], f"{requirement!r} ships compiled code: {compiled[:3]}"


def test_manifest_loggers_cover_the_vendored_packages() -> None:
    # "Enable debug logging" in the UI sets these loggers; the engine and the binding log under their own names.
    assert {"rkllm_engine", "rkllm_native", "rkllm_openai"} <= set(manifest().get("loggers", []))


class _ComponentImports(ast.NodeVisitor):
    """The `homeassistant.components.X` domains a module imports, outside `if TYPE_CHECKING:` (as hassfest)."""

    def __init__(self) -> None:
        self.domains: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "homeassistant.components":
            self.domains.update(alias.name for alias in node.names)
        elif node.module and node.module.startswith("homeassistant.components."):
            self.domains.add(node.module.split(".")[2])

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith("homeassistant.components."):
                self.domains.add(alias.name.split(".")[2])


def undeclared_component_imports(integration: Path, content: dict[str, Any]) -> dict[str, set[str]]:
    """Per file, the imported HA integrations hassfest would report as missing from (after_)dependencies."""
    allowed = ALWAYS_ALLOWED | set(content.get("dependencies", [])) | set(content.get("after_dependencies", []))
    problems: dict[str, set[str]] = {}
    for path in sorted(integration.rglob("*.py")):
        relative = path.relative_to(integration)
        collector = _ComponentImports()
        collector.visit(ast.parse(path.read_text(encoding="utf-8")))
        stem = relative.stem if len(relative.parts) == 1 else relative.parts[0]
        platform_of_other = stem in HA_INTEGRATIONS
        bad = set()
        for domain in collector.domains - allowed - {content["domain"]}:
            if platform_of_other and domain == stem:
                continue  # diagnostics.py may import homeassistant.components.diagnostics
            if not platform_of_other and ((integration / f"{domain}.py").is_file() or (integration / domain).is_dir()):
                continue
            bad.add(domain)
        if bad:
            problems[relative.as_posix()] = bad
    return problems


def test_every_imported_home_assistant_integration_is_declared() -> None:
    assert undeclared_component_imports(INTEGRATION, manifest()) == {}


def test_the_import_rule_catches_an_undeclared_integration(tmp_path: Path) -> None:
    (tmp_path / "entity.py").write_text("from homeassistant.components.mqtt import subscription\n")
    (tmp_path / "diagnostics.py").write_text("from homeassistant.components.diagnostics import REDACTED\n")
    (tmp_path / "util.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from homeassistant.components.zha import x\n"
    )
    content = {"domain": "rkllm", "dependencies": ["http"], "after_dependencies": []}
    assert undeclared_component_imports(tmp_path, content) == {"entity.py": {"mqtt"}}


def test_async_setup_comes_with_a_config_schema() -> None:
    tree = ast.parse((INTEGRATION / "__init__.py").read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)}
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    if "async_setup" in functions:
        assert "CONFIG_SCHEMA" in assigned, "hassfest: an integration with async_setup must define CONFIG_SCHEMA"


# ---------------------------------------------------------------------------------------------------------------
# Brand and translations
# ---------------------------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature and the chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, "IHDR CRC mismatch"
    width, height = struct.unpack(">II", body[:8])
    return width, height


def test_brand_icon_is_a_256_pixel_square_png() -> None:
    data = (INTEGRATION / "brand" / "icon.png").read_bytes()
    assert png_size(data) == (256, 256)
    assert data.endswith(b"IEND\xaeB`\x82")


def test_strings_json_equals_the_english_translation() -> None:
    assert read_json(INTEGRATION / "strings.json") == read_json(INTEGRATION / "translations" / "en.json")


def _steps_with_data(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict):
            found.append((path, node))
        for key, value in node.items():
            found.extend(_steps_with_data(value, f"{path}/{key}"))
    return found


def test_every_form_field_has_a_description() -> None:
    steps = _steps_with_data(read_json(INTEGRATION / "strings.json"))
    assert steps, "strings.json has no form with data fields"
    for path, step in steps:
        described = set(step.get("data_description", {}))
        fields = set(step["data"])
        assert described <= fields, f"{path}: data_description for unknown fields {sorted(described - fields)}"
        assert fields <= described, f"{path}: fields without data_description {sorted(fields - described)}"
