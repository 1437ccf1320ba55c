"""Sessions: `nox -s lint tests` is the project's test command (README, .ci/run).

`tests` runs in the environment nox itself runs from (where README's install put clothcli),
so CI checks exactly the installation a user makes, and torch is not installed twice.
"""

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
        *session.posargs,
        env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )
