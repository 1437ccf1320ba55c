import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from clothcli.cli import app

PAGE_FAULTS = textwrap.dedent(
    """
    import resource, torch
    from clothcli.allocator import keep_freed_memory

    def faults_of_a_step():
        # like a training step: several large activations (40 MB each) alive at once, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activations = [torch.ones(10 * 2**20) for _ in range(4)]
        del activations
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    system = [faults_of_a_step() for _ in range(3)][-1]
    applied = keep_freed_memory()
    # the heap grows over the first steps, then reuses its pages
    print(applied, system, max([faults_of_a_step() for _ in range(10)][-3:]))
    """
)


def page_faults(env: dict[str, str]) -> tuple[bool, int, int]:
    proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, check=True, env={**env})
    applied, system, kept = proc.stdout.split()
    return applied == "True", int(system), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():

    env = {k: v for k, v in os.environ.items() if k != "CLOTHCLI_SYSTEM_MALLOC"}
    applied, system, kept = page_faults(env)
    # glibc maps every 40 MB block afresh (40960 faults a step with 4-KiB pages); kept in the heap,
    # the steps reuse its pages
    assert applied and system > 0 and kept <= system // 10, (system, kept)
    applied, system, kept = page_faults({**env, "CLOTHCLI_SYSTEM_MALLOC": "1"})
    assert not applied and kept > system // 10, (system, kept)


def test_every_command_starts_with_the_allocator_setting(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("clothcli.cli.application.keep_freed_memory", lambda: calls.append(True))
    result = CliRunner().invoke(app, ["analyze-data", str(tmp_path / "missing")])
    assert result.exit_code == 2 and calls == [True]
