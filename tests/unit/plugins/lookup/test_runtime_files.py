"""The runtime_files lookup, run by ansible-playbook the way the roles use it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest as rm

REPO = Path(__file__).resolve().parents[4]
ANSIBLE = os.path.join(os.path.dirname(sys.executable), "ansible")


def _lookup(args):
    out = subprocess.run([ANSIBLE, "localhost", "-m", "ansible.builtin.debug", "-a",
                          "msg={{ lookup('stiefel.system.runtime_files', %s) | to_json }}" % args],
                         cwd=str(REPO), capture_output=True, text=True, check=False,
                         env=dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1"))
    return out


def _msg(out):
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return json.loads(result["msg"]) if isinstance(result["msg"], str) else result["msg"]


def test_files_and_directories_match_the_manifest():
    files = _msg(_lookup("'laptop', wantlist=True"))
    assert files == [entry.as_dict() for entry in rm.entries("laptop")]
    dirs = _msg(_lookup("'laptop', kind='directories', wantlist=True"))
    assert dirs == rm.directories(rm.entries("laptop"))


def test_unknown_target_fails_with_the_reason():
    out = _lookup("'desktop'")
    assert out.returncode != 0
    assert "unknown target 'desktop'" in out.stdout + out.stderr


def test_content_carries_each_file_base64():
    files = _msg(_lookup("'standalone', content=True, wantlist=True"))
    entries = rm.entries("standalone")
    assert [f["dest"] for f in files] == [e.dest for e in entries]
    for item, entry in zip(files, entries):
        with open(entry.src, "rb") as handle:
            assert base64.b64decode(item["content"]) == handle.read()
