"""Command line: `waso operator`, and the tools for platform engineers."""
