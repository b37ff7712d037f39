"""Does the T2I reward rank the right samples of a base group first (README.md beside this file)."""
