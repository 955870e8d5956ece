"""Docstring examples (collected by ``--doctest-modules``) show a solver's failure through
its result's ``status``; the suite-wide "ConvergenceWarning is an error" filter is for the
tests, which must expect every warning they cause."""

import pytest
from _pytest.doctest import DoctestItem


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, DoctestItem):
            item.add_marker(pytest.mark.filterwarnings("ignore::hvpfunc.ConvergenceWarning"))
