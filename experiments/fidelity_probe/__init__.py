"""Which judge fault a long KL run drifts into, and whether the reward models rank it (README.md beside this file)."""
