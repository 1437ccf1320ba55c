"""`python -m clothcli`, which is also how `accelerate launch -m clothcli ...` starts processes."""

from clothcli.cli import main

if __name__ == "__main__":
    main()
