"""OPD cost levers and Mix-RL on the same chain (README.md beside this file)."""
