"""`python -m kvserve ...` is the `kvserve` command."""
import sys

from kvserve.server.cli import main

sys.exit(main())
