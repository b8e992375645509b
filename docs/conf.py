"""Sphinx configuration of the robust-infl documentation (``make docs``)."""

import os
import pkgutil
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "robust-infl"
author = "robust-infl contributors"
copyright = "robust-infl contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = "robust-infl"

# Every cross-reference must resolve (a renamed public name fails the build), except those to other
# libraries (no network for intersphinx) and to the packages' internal modules, which the API
# reference (the public names of each package's ``__all__``) does not document.
_INTERNAL = sorted(f"{package}.{module.name}" for package in ("attacks", "robust_infl", "defenses")
                   for module in pkgutil.iter_modules([os.path.join(ROOT, package)]))
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|abc|typing|collections|os)\..*"),
    (r"py:.*", r"(%s)(\..*)?" % "|".join(re.escape(name) for name in _INTERNAL)),
    (r"py:class", r"Module"),  # torch's own docstring of nn.Module.forward, inherited by our modules
]
