"""The examples in the package's docstrings run and print what they say.

Every module of the package is searched; a module whose examples fail, or a package without
examples at all, fails the test (conftest gives the process the 8 devices the communication
example uses).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import orth_dion_jax

MODULES = sorted(m.name for m in pkgutil.iter_modules(orth_dion_jax.__path__,
                                                      "orth_dion_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_public_functions_have_examples():
  attempted = sum(doctest.testmod(importlib.import_module(name)).attempted
                  for name in MODULES)
  assert attempted >= 20
