"""Layout facts of the collection (design brief section 2, docs/dev/contracts.md).

The repository root is the collection ``stiefel.system``; a committed
relative symlink makes it importable and usable from a plain checkout.
Every module documents itself; every role documents its prefixed variables.
"""

from __future__ import annotations

import ast
import configparser
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SYMLINK = REPO / "collections" / "ansible_collections" / "stiefel" / "system"

MODULES = sorted(p for p in (REPO / "plugins" / "modules").glob("*.py") if p.name != "__init__.py")
ROLES = sorted(p for p in (REPO / "roles").glob("*") if p.is_dir() and not p.name.startswith("."))


def _load_yaml(path: Path):
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _role_defaults(role: Path) -> dict:
    """Merge defaults/main.yml or defaults/main/*.yml (Ansible's two layouts)."""
    merged: dict = {}
    for name in ("main.yml", "main.yaml"):
        if (role / "defaults" / name).is_file():
            merged.update(_load_yaml(role / "defaults" / name) or {})
    main_dir = role / "defaults" / "main"
    if main_dir.is_dir():
        for path in sorted(main_dir.glob("*.y*ml")):
            merged.update(_load_yaml(path) or {})
    return merged


def _argument_specs(role: Path) -> dict:
    for name in ("argument_specs.yml", "argument_specs.yaml"):
        path = role / "meta" / name
        if path.is_file():
            return _load_yaml(path) or {}
    return {}


# ---- the collection ------------------------------------------------------------


def test_symlink_is_relative_and_resolves_to_repo_root():
    assert SYMLINK.is_symlink(), f"{SYMLINK} must be a symlink"
    target = os.readlink(SYMLINK)
    assert not os.path.isabs(target), f"symlink target must be relative, is {target!r}"
    assert SYMLINK.resolve() == REPO


def test_ansible_cfg_points_collections_path_at_collections():
    cfg = configparser.ConfigParser()
    assert cfg.read(REPO / "ansible.cfg"), "ansible.cfg missing"
    paths = [p.strip() for p in cfg.get("defaults", "collections_path").split(":")]
    assert (REPO / paths[0]).resolve() == (REPO / "collections").resolve()


def test_galaxy_names_the_collection():
    galaxy = _load_yaml(REPO / "galaxy.yml")
    assert galaxy["namespace"] == "stiefel"
    assert galaxy["name"] == "system"
    assert galaxy["version"], "galaxy.yml needs a version"
    # build outputs, caches and the dev environment never go into a built collection
    # (tests/integration/test_galaxy_install.py checks the built tarball itself)
    for ignored in (".cache", ".venv", ".hypothesis", ".pytest_cache", "collections", "bench/results"):
        assert ignored in galaxy.get("build_ignore", []), f"build_ignore lacks {ignored}"


def test_playbook_names_are_valid_fqcn_parts():
    # `ansible-playbook stiefel.system.NAME` accepts only Python-identifier-like names
    names = sorted(p.stem for p in (REPO / "playbooks").glob("*.y*ml"))
    assert names, "no playbooks"
    assert [n for n in names if not n.isidentifier() or n != n.lower()] == []


def test_molecule_scenarios_live_where_molecule_looks_for_a_collection():
    # Molecule 26 reads extensions/molecule/ in a collection; a root molecule/ makes it
    # warn and look for molecule/default, and bare `molecule test` runs the default scenario
    assert not (REPO / "molecule").exists()
    scenarios = sorted(p.parent.name for p in (REPO / "extensions" / "molecule").glob("*/molecule.yml"))
    assert "default" in scenarios and len(scenarios) > 1, scenarios


def test_runtime_yml_declares_requires_ansible():
    runtime = _load_yaml(REPO / "meta" / "runtime.yml")
    assert isinstance(runtime, dict)
    assert str(runtime.get("requires_ansible", "")).startswith(">="), runtime


def test_collection_imports_through_the_symlink():
    """pytest.ini puts <repo>/collections on sys.path (pythonpath): the namespace resolves here."""
    import ansible_collections.stiefel.system as coll  # noqa: PLC0415

    paths = [Path(p).resolve() for p in coll.__path__]
    assert REPO in paths


# ---- modules -------------------------------------------------------------------


def _module_constants(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    found[target.id] = node.value.value
    return found


def _parse_yaml_block(module: Path, name: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        pytest.fail(f"{module.name}: {name} is not valid YAML: {exc}", pytrace=False)


@pytest.mark.parametrize("module", MODULES, ids=[m.stem for m in MODULES])
def test_module_documents_itself(module: Path):
    consts = _module_constants(module)
    for name in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
        assert name in consts, f"{module.name}: no module-level {name} string"
    doc = _parse_yaml_block(module, "DOCUMENTATION", consts["DOCUMENTATION"])
    assert isinstance(doc, dict), f"{module.name}: DOCUMENTATION is not a YAML mapping"
    assert doc.get("module") == module.stem, f"{module.name}: DOCUMENTATION.module is {doc.get('module')!r}"
    assert doc.get("short_description"), f"{module.name}: no short_description"
    examples = _parse_yaml_block(module, "EXAMPLES", consts["EXAMPLES"])
    assert isinstance(examples, list) and examples, f"{module.name}: EXAMPLES is not a YAML task list"
    ret = _parse_yaml_block(module, "RETURN", consts["RETURN"])
    assert ret is None or isinstance(ret, dict), f"{module.name}: RETURN is not a YAML mapping"


# ---- roles -----------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_role_has_argument_specs(role: Path):
    specs = _argument_specs(role)
    assert specs, f"{role.name}: meta/argument_specs.yml missing or empty"
    assert "main" in specs.get("argument_specs", {}), f"{role.name}: no 'main' entry point"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_role_defaults_are_prefixed_and_documented(role: Path):
    defaults = _role_defaults(role)
    prefix = f"{role.name}_"
    unprefixed = sorted(k for k in defaults if not str(k).startswith(prefix))
    assert not unprefixed, f"{role.name}: defaults without the {prefix!r} prefix: {unprefixed}"
    options = (
        (_argument_specs(role).get("argument_specs") or {}).get("main", {}).get("options") or {}
    )
    undocumented = sorted(k for k in defaults if k not in options)
    assert not undocumented, f"{role.name}: defaults not in meta/argument_specs.yml: {undocumented}"
    unprefixed_options = sorted(k for k in options if not str(k).startswith(prefix))
    assert not unprefixed_options, f"{role.name}: argument_specs options without prefix: {unprefixed_options}"


# ---- sanity ignores --------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "tests" / "sanity").glob("ignore-*.txt")), ids=lambda p: p.name)
def test_every_sanity_ignore_states_its_reason(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry, _sep, reason = line.partition("#")
        assert entry.strip(), f"{path.name}:{number}: comment-only or empty line (ansible-test rejects it)"
        assert len(entry.split()) == 2, f"{path.name}:{number}: expected '<path> <test>[:<code>]  # reason'"
        assert (REPO / entry.split()[0]).exists(), f"{path.name}:{number}: {entry.split()[0]} does not exist"
        assert len(reason.strip()) >= 10, f"{path.name}:{number}: no reason given after '#'"
