"""kvserve's benchmark suite: `kvserve bench <name>` or `python -m kvserve.bench <name>`."""
