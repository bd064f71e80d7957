"""The standalone server's systemd unit agrees with how the agent ends.

``systemctl stop`` sends SIGTERM; stiefel-server turns it into ``sys.exit(143)`` so its cleanup stops
nbdkit. systemd counts a death by SIGTERM as clean, but not exit code 143 unless the unit says so: under
a real systemd (tests/integration/test_systemd_units_qemu.py) the stopped unit was left "failed".
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "roles" / "standalone_server" / "templates" / "stiefel-server-standalone.service.j2"


def _agent():
    """The server agent's module (agents/stiefel-server is a shim over its main)."""
    from stiefel_runtime import server
    return server


def _service_values(key):
    values = []
    for line in TEMPLATE.read_text(encoding="utf-8").splitlines():
        if line.startswith(key + "="):
            values += line.split("=", 1)[1].split()
    return values


def test_exit_code_after_sigterm_is_a_success_for_systemd():
    with pytest.raises(SystemExit) as stopped:
        _agent()._terminate(signal.SIGTERM, None)
    code = str(stopped.value.code)
    assert code in _service_values("SuccessExitStatus")
    assert code not in _service_values("RestartPreventExitStatus")  # only "refused" (2) is final


def test_refused_exit_code_still_stops_restarts():
    assert _agent().EXIT_REFUSED == 2
    assert "2" in _service_values("RestartPreventExitStatus")
    assert "2" not in _service_values("SuccessExitStatus")
