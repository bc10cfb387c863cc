"""Command-line applications: `fastvit-style train`, `stylize` and `tta` (see fastvit_style.cli)."""
