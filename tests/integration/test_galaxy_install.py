"""The collection as a Galaxy user gets it: built, installed into a fresh path, used by name.

``ansible-galaxy collection build`` of this checkout gives the tarball; its file list carries what
the targets need at run time (``stiefel_runtime/``, ``agents/``, the roles' files, the plugins) and
none of a checkout's debris (caches, venv, test and bench outputs, the ``collections/`` symlinks).
Installed with ``ansible-galaxy collection install -p``, and used from a directory without the
checkout's ansible.cfg and with only that path in ANSIBLE_COLLECTIONS_PATH: every module and the
lookup render with ansible-doc from the installed copy, the lookup gives each target files of the
installed copy, and ``ansible-playbook stiefel.system.build_image --check`` (by FQCN) plans the whole
ramdisk build from it without writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
# Checkout paths that must never reach a user: caches, the dev environment, outputs, the symlinks.
FORBIDDEN_PARTS = {".cache", ".venv", ".git", ".ansible", ".hypothesis", ".pytest_cache", "__pycache__",
                   "collections"}
FORBIDDEN_PREFIXES = ("tests/output/", "bench/results/")
FORBIDDEN_SUFFIXES = (".pyc", ".tar.gz")
# What the roles and the targets read from the collection at run time.
RUNTIME_DIRS = ("plugins", "roles", "stiefel_runtime", "agents", "playbooks", "meta")


def log(msg):
    print("[galaxy %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def run(argv, cwd, env, timeout=600):
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    log("%s: rc %d in %.1f s" % (" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv[:3])),
                                 proc.returncode, time.monotonic() - started))
    return proc


class Installed(object):
    """The built tarball and the collection installed from it."""

    def __init__(self, tmp, tarball, path):
        self.tmp = tmp
        self.tarball = tarball
        self.collections = path
        self.root = os.path.join(path, "ansible_collections", "stiefel", "system")
        # Outside the checkout (no ansible.cfg pointing at ./collections), the install path the only
        # collections path and no PYTHONPATH: nothing but the installed copy can provide stiefel.system
        # (the venv's site-packages gives ansible.posix's json callback; the tests check every file used
        # is under the install path).
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "PYTHONPATH"}
        self.env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_COLLECTIONS_PATH=path, PATH=BIN + os.pathsep + os.environ["PATH"])

    def run(self, *argv, timeout=600, json_output=False):
        env = self.env
        if json_output:
            # results and stats as data, read by key rather than from the default callback's text
            env = dict(env, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
        return run([os.path.join(BIN, argv[0])] + list(argv[1:]), cwd=self.tmp, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def installed():
    tmp = tempfile.mkdtemp(prefix="stf-galaxy-")
    try:
        env = dict(os.environ, ANSIBLE_NOCOLOR="1")
        dist = os.path.join(tmp, "dist")
        built = run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", REPO, "--output-path", dist],
                    cwd=tmp, env=env)
        assert built.returncode == 0, built.stdout + built.stderr
        (tarball,) = [os.path.join(dist, n) for n in os.listdir(dist)]
        log("built %s (%d bytes)" % (os.path.basename(tarball), os.path.getsize(tarball)))
        inst = Installed(tmp, tarball, os.path.join(tmp, "collections"))
        got = inst.run("ansible-galaxy", "collection", "install", tarball, "-p", inst.collections)
        assert got.returncode == 0, got.stdout + got.stderr
        assert os.path.isfile(os.path.join(inst.root, "MANIFEST.json")), got.stdout
        yield inst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _forbidden(name):
    parts = name.split("/")
    return (FORBIDDEN_PARTS.intersection(parts) or name.startswith(FORBIDDEN_PREFIXES)
            or name.endswith(FORBIDDEN_SUFFIXES))


def _member_name(member):
    return member.name[2:] if member.name.startswith("./") else member.name


def _tracked_runtime_files():
    """Tracked files of the run-time directories that exist in the work tree (relative paths)."""
    out = subprocess.run(["git", "-C", REPO, "ls-files", "--"] + list(RUNTIME_DIRS), capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout: %s" % out.stderr.strip())
    return {p for p in out.stdout.splitlines() if os.path.isfile(os.path.join(REPO, p))}


def test_tarball_has_the_runtime_and_no_checkout_debris(installed):
    with tarfile.open(installed.tarball) as tar:
        members = tar.getmembers()
    names = {_member_name(m) for m in members}
    files = {_member_name(m) for m in members if m.isfile()}
    log("tarball: %d entries, %d files, %d bytes unpacked"
        % (len(members), len(files), sum(m.size for m in members if m.isfile())))
    assert sorted(n for n in names if _forbidden(n)) == []
    assert [m.name for m in members if m.issym() or m.islnk()] == []
    missing = sorted(_tracked_runtime_files() - files)
    assert missing == [], "tracked run-time files missing from the tarball: %s" % missing
    for needed in ("MANIFEST.json", "FILES.json", "meta/runtime.yml", "stiefel_runtime/__main__.py",
                   "agents/stiefel-server", "plugins/lookup/runtime_files.py", "playbooks/setup_server.yml"):
        assert needed in files
    # and what the tarball holds is what got installed
    for name in files:
        assert os.path.isfile(os.path.join(installed.root, name)), name


def _plugins(installed, kind):
    directory = os.path.join(installed.root, "plugins", kind)
    return sorted("stiefel.system." + n[:-3] for n in os.listdir(directory)
                  if n.endswith(".py") and n != "__init__.py")


@pytest.mark.parametrize("kind,plugin_dir", [("module", "modules"), ("lookup", "lookup")])
def test_ansible_doc_renders_every_plugin_from_the_installed_copy(installed, kind, plugin_dir):
    names = _plugins(installed, plugin_dir)
    assert names, "no %s plugins installed" % kind
    listed = installed.run("ansible-doc", "-t", kind, "-l", "stiefel.system")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip()) == names
    docs = installed.run("ansible-doc", "-t", kind, "--json", *names)
    assert docs.returncode == 0, docs.stdout + docs.stderr
    rendered = json.loads(docs.stdout)
    assert sorted(rendered) == names
    for name, doc in rendered.items():
        assert doc["doc"]["short_description"], name
        assert doc["doc"]["filename"].startswith(installed.root + os.sep), (name, doc["doc"]["filename"])
    # the text form too (what a user reads): every option section renders
    text = installed.run("ansible-doc", "-t", kind, *names)
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("OPTIONS") >= len(names)
    log("%d %s plugin(s) rendered: %s" % (len(names), kind, ", ".join(names)))


@pytest.mark.parametrize("target", ["laptop", "standalone", "ramdisk"])
def test_runtime_files_lookup_gives_the_installed_files(installed, target):
    out = installed.run("ansible", "localhost", "-m", "ansible.builtin.debug", "-a",
                        "msg={{ lookup('stiefel.system.runtime_files', '%s', wantlist=True) | to_json }}" % target,
                        json_output=True)
    assert out.returncode == 0, out.stdout + out.stderr
    msg = json.loads(out.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]["msg"]
    entries = json.loads(msg) if isinstance(msg, str) else msg
    assert entries, "no files for %s" % target
    for entry in entries:
        assert entry["src"].startswith(installed.root + os.sep), entry
        assert os.path.isfile(entry["src"]), entry
    dests = {e["dest"] for e in entries}
    assert any(d.startswith("agents/stiefel-") for d in dests), dests
    assert "python/stiefel_runtime/__main__.py" in dests
    assert not any(d.endswith(("/ramdisk_build.py", "/usb_image.py", "/runtime_manifest.py")) for d in dests)
    log("%s: %d files from the installed copy" % (target, len(entries)))


def test_every_playbook_resolves_by_fqcn(installed):
    names = sorted("stiefel.system." + n[:-4] for n in os.listdir(os.path.join(installed.root, "playbooks"))
                   if n.endswith(".yml"))
    assert "stiefel.system.setup_server" in names
    check = installed.run("ansible-playbook", "--syntax-check", *names)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in names:
        path = os.path.join(installed.root, "playbooks", name.split(".")[-1] + ".yml")
        assert "playbook: %s" % path in check.stdout, (name, check.stdout)
    log("%d playbooks by FQCN: %s" % (len(names), ", ".join(names)))


def test_playbook_by_fqcn_plans_the_ramdisk_without_writing(installed):
    """``stiefel.system.build_image --check`` into an empty directory: every stage would run, none does."""
    output = os.path.join(installed.tmp, "ramdisk")
    os.mkdir(output)
    play = installed.run("ansible-playbook", "stiefel.system.build_image", "--check",
                         "-e", "ramdisk_output_dir=%s" % output, timeout=900, json_output=True)
    assert play.returncode == 0, play.stdout[-4000:] + play.stderr
    result = json.loads(play.stdout)
    counts = result["stats"]["localhost"]
    tasks = [t for p in result["plays"] for t in p["tasks"]]
    changed = [t["task"]["name"] for t in tasks if t["hosts"]["localhost"].get("changed")]
    messages = json.dumps([t["hosts"]["localhost"].get("msg") for t in tasks])
    log("stiefel.system.build_image --check: %s; would change: %s" % (counts, "; ".join(changed)))
    assert counts["failures"] == 0 and counts["unreachable"] == 0
    assert counts["ok"] >= 3
    # an empty output directory: the base root, its packing and the overlay would all be (re)built
    assert counts["changed"] == len(changed) >= 3
    # the plan hashed the agents and library of the installed copy
    assert "agents: stiefel-autokexec, stiefel-client, stiefel-server" in messages
    assert "would write vmlinuz, initrd.img and manifest.json to %s" % output in messages
    assert os.listdir(output) == [], "check mode wrote %s" % os.listdir(output)
