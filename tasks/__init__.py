"""Flyte tasks: thin typed wrappers around flowrl.stages."""
