"""kvserve's benchmark suite: `python -m bench <name>` or `kvserve bench <name>`."""
