"""Command-line plumbing of the entry points: `console` (logging, flag errors, `run`)."""
