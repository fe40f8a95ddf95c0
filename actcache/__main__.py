"""`python -m actcache`: start the command line through the installed `actcache`
console-script entry point, so the library itself never imports the CLI."""

import sys
from importlib.metadata import entry_points


def main() -> None:
    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "actcache"]
    if not eps:
        sys.exit("actcache's command line is not installed; run `pip install -e .` in the repository")
    eps[0].load()()


if __name__ == "__main__":
    main()
