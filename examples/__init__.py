"""Runnable example graphs (Python and YAML) used by the README and the tests."""
