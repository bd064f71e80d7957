"""lab/ansible_output.py: the one reader of Ansible's default callback output for tests and benchmarks."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lab import ansible_output

PLAYBOOK_OUT = """
PLAY [Build the ramdisk] *******************************************************

TASK [Gathering Facts] *********************************************************
ok: [localhost]

TASK [stiefel.system.ramdisk : Check inputs] ***********************************
ok: [localhost]

TASK [stiefel.system.ramdisk : Pack /init, the library and the agents : overlay] *
changed: [localhost]

TASK [stiefel.system.ramdisk : Copy files] *************************************
ok: [localhost] => (item=a)
changed: [localhost] => (item=b)
changed: [localhost] => (item=c)

TASK [A playbook-level task] ***************************************************
changed: [localhost]

RUNNING HANDLER [stiefel.system.ramdisk : Restart it] **************************
changed: [localhost]

TASK [stiefel.system.ramdisk : Write vmlinuz] **********************************
skipping: [localhost]
changed: [otherhost]

PLAY RECAP *********************************************************************
localhost                  : ok=7    changed=4    unreachable=0    failed=0    skipped=1    rescued=0    ignored=0
otherhost                  : ok=1    changed=1    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0
"""


def test_changed_tasks_are_role_tasks_once_each_in_order():
    assert ansible_output.changed_tasks(PLAYBOOK_OUT) == [
        "Pack /init, the library and the agents : overlay", "Copy files", "Write vmlinuz"]


def test_recap_counts_per_host():
    hosts = ansible_output.recap(PLAYBOOK_OUT)
    assert hosts["localhost"]["changed"] == 4 and hosts["localhost"]["skipped"] == 1
    assert hosts["otherhost"] == dict(ok=1, changed=1, unreachable=0, failed=0, skipped=0, rescued=0, ignored=0)
    assert ansible_output.recap_changed(PLAYBOOK_OUT, "otherhost") == 1


def test_recap_changed_needs_the_host_or_a_single_one():
    with pytest.raises(AssertionError):
        ansible_output.recap_changed(PLAYBOOK_OUT)  # two hosts: which one?
    with pytest.raises(AssertionError):
        ansible_output.recap_changed(PLAYBOOK_OUT, "nohost")
    single = "PLAY RECAP ***\n/tmp/stf-role-x/root : ok=3 changed=0 unreachable=0 failed=0\n"
    assert ansible_output.recap_changed(single) == 0


def test_module_result_changed_and_failed():
    out = 'localhost | CHANGED => {\n    "changed": true,\n    "pid": 42\n}\n'
    assert ansible_output.module_result(out, 0) == {"changed": True, "pid": 42, "_rc": 0, "failed": False}
    out = 'localhost | FAILED! => {\n    "changed": false,\n    "msg": "refusing to export"\n}\n'
    result = ansible_output.module_result(out, 2)
    assert result["failed"] is True and result["_rc"] == 2 and result["msg"] == "refusing to export"


def test_module_result_without_a_result_says_what_it_saw():
    with pytest.raises(AssertionError, match="unexpected ansible output"):
        ansible_output.module_result("ERROR! the module was not found\n", 1, "stderr text")


@given(st.text(max_size=400))
def test_readers_take_any_text(text):
    """Garbage (a crashed run, a changed callback) gives empty readings or AssertionError, nothing else."""
    assert isinstance(ansible_output.changed_tasks(text), list)
    assert isinstance(ansible_output.recap(text), dict)
    for call in (lambda: ansible_output.recap_changed(text), lambda: ansible_output.module_result(text, 1)):
        try:
            call()
        except (AssertionError, ValueError):  # ValueError: json's JSONDecodeError
            pass
