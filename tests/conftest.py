"""Shared pytest setup for stiefel.system.

- Imports need no setup here: pytest.ini's ``pythonpath`` puts
  ``<repo>/collections`` first on ``sys.path`` (``ansible_collections.stiefel.system``
  and ``stiefel_runtime`` resolve to this checkout through the committed
  symlinks) and the repository root after it (``lab``).
- Selects the hypothesis profile: ``ci`` (more examples, no deadline) when
  ``CI=true``, ``dev`` otherwise; ``HYPOTHESIS_PROFILE`` overrides.
- Provides the ``cache_dir`` fixture (``$STIEFEL_CACHE_DIR`` or
  ``<repo>/.cache``) and ``require_root()``, which skips with a reason when
  not running as root (CI runs as root).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS_DIR = REPO_ROOT / "collections"

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in requirements/dev.txt; tolerate its absence
    settings = None
else:
    _base = settings.get_profile("default")
    # ci: many examples, deterministic (derandomize) so a CI failure reproduces,
    # no deadline (TCG-era machines are slow and shared); dev: quick, random.
    settings.register_profile(
        "ci",
        parent=_base,
        max_examples=1000,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", parent=_base, max_examples=100, deadline=None)
    _default_profile = "ci" if os.environ.get("CI", "").lower() in ("true", "1", "yes") else "dev"
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))


def stiefel_cache_dir() -> Path:
    """The build-output directory: ``$STIEFEL_CACHE_DIR`` or ``<repo>/.cache``."""
    env = os.environ.get("STIEFEL_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (which is also the collection root)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The build-output directory (created if missing). Producers use their own subdirectory."""
    path = stiefel_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_root() -> None:
    """Skip the calling test (with a reason) unless running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, loop devices, QEMU taps); CI runs as root")


@pytest.fixture
def root_required() -> None:
    """Fixture form of :func:`require_root`."""
    require_root()


@pytest.fixture(scope="session")
def agent_env() -> dict:
    """The environment an agent shim (agents/stiefel-*) needs in a checkout: what PYTHONPATH=/usr/lib/stiefel/python
    gives it on a target (``ansible_collections`` and ``stiefel_runtime`` side by side)."""
    return dict(os.environ, PYTHONPATH=str(COLLECTIONS_DIR), PYTHONUNBUFFERED="1")
