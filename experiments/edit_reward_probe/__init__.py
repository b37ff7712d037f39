"""The edit reward on held-out instruction texts: ideal output against a no-op (README.md beside this file)."""
