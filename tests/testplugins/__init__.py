"""Plugins used only by the tests, loaded into a real milterd through [plugins] modules."""
