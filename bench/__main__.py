import sys

from kvserve.bench.cli import main

sys.exit(main())
