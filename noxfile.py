"""Sessions: `nox -s lint tests` is the project's test command (README, .ci/run).

`tests` runs in the environment nox itself runs from (where README's install put clothcli),
so CI checks exactly the installation a user makes, and torch is not installed twice. Two pytest
processes (pytest-xdist, a test module each at a time): much of the suite starts `clothcli`
processes, whose imports run on one core, so two processes finish the suite in about 85% of the
time one takes on a 2-core machine.

`executorch` runs the ExecuTorch backend's tests. ExecuTorch's wheels are built against one torch
release, so it stays out of the dev extras: the session's own virtualenv sees this environment's
packages behind its own (one .pth line) and installs executorch there, so a wheel that wanted
another torch would get it in that virtualenv and leave this environment's alone.
"""

import sysconfig
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("lint-imports")  # the layers and no-cycle contracts in pyproject.toml


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        "--dist",
        "loadfile",
        *session.posargs,
        env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )


@nox.session(reuse_venv=True)
def executorch(session: nox.Session) -> None:
    parent = sysconfig.get_paths()["purelib"]  # the environment nox runs from, with clothcli in it
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = session.run("python", "-c", script, silent=True).strip()
    Path(own, "clothcli_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    session.install("executorch>=1.5,<1.6")  # the releases built for torch 2.14
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_executorch.py", *session.posargs,
        env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
