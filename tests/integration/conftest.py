"""Fixtures the integration tests share: the agents' namespaces, a QEMU lab and the cached ramdisk build.

The helpers behind them live in ``lab/`` (importable through pytest.ini's ``pythonpath``), so that no test
module imports another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from lab import ansible_output
from lab.netns import Namespaces
from lab.qemu import RamdiskUnavailable, build_image, cache_dir, ramdisk_files, vm_lab


@pytest.fixture
def world(request):
    """``(ns, tmp, agents)``: the two agent namespaces, a scratch directory and a list of
    :class:`lab.agents.Agent` that are stopped (by PID) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if not shutil.which("nbdkit"):
        pytest.skip("needs nbdkit")
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True, check=False).returncode:
        pytest.skip("needs python3-libnbd for /usr/bin/python3")
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="stf-agents-")
    ns = Namespaces().create()
    agents = []
    try:
        yield ns, tmp, agents
    finally:
        for agent in agents:
            agent.stop()
        ns.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
        print("\n[%s] took %.1f s" % (request.node.name, time.monotonic() - started))


@pytest.fixture
def qemu_lab(request):
    """``(workdir, link, vms)`` of :func:`lab.qemu.vm_lab`, named by the test module's
    ``@pytest.mark.qemu_lab(name, tools=(...))``; skipped unless root with QEMU and those tools."""
    marker = request.node.get_closest_marker("qemu_lab")
    assert marker is not None, "%s: qemu_lab needs @pytest.mark.qemu_lab(name)" % request.node.nodeid
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, taps)")
    for tool in ("qemu-system-x86_64",) + tuple(marker.kwargs.get("tools", ())):
        if not shutil.which(tool):
            pytest.skip("needs %s" % tool)
    with vm_lab(marker.args[0]) as parts:
        yield parts


@pytest.fixture(scope="module")
def built():
    """The ramdisk built (or found up to date) by playbooks/build_image.yml: its manifest.json."""
    if os.geteuid() != 0:
        pytest.skip("building the ramdisk needs root (mmdebstrap --mode=root)")
    for tool in ("mmdebstrap", "cpio", "zstd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip("%s is not installed" % tool)
    changed, stdout, _seconds = build_image()
    print("build: changed=%d (%s)" % (changed, ", ".join(ansible_output.changed_tasks(stdout)) or "nothing rebuilt"))
    with open(os.path.join(cache_dir(), "ramdisk", "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def ramdisk_pair():
    """``(kernel, ramdisk)`` of the cached ramdisk build (:func:`lab.qemu.ramdisk_files`); skipped when
    there is none."""
    try:
        return ramdisk_files()
    except RamdiskUnavailable as exc:
        pytest.skip(str(exc))
