"""Collection settings for the doctests under triqdef/ (pytest runs them with
``--doctest-modules``): an integration whose framework is not installed is skipped."""

from __future__ import annotations

import importlib.util

collect_ignore = [
    path
    for path, package in (("triqdef/integrations/lightning.py", "lightning"),)
    if importlib.util.find_spec(package) is None
]
