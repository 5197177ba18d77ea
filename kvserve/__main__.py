"""`python -m kvserve ...` is the `kvserve` command."""
import sys

from kvserve.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
