"""kvserve's HTTP server: TGI and OpenAI-compatible APIs over the AsyncEngine, plus the CLI."""
