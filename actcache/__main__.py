"""`python -m actcache`: the entry-point shim, the one place actcache reaches the CLI."""

from cli.main import app

if __name__ == "__main__":
    app()
