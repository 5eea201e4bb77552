"""Sphinx configuration of dropr's documentation.

Built with ``sphinx-build -W -b html docs docs/_build/html``: every warning
is an error, so a page that drifts from the code fails the build.  No
extension beyond Sphinx's own: the build needs no network and nothing that
``pip install '.[dev]'`` does not bring.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Document the code of this checkout, installed or not.
sys.path.insert(0, os.path.dirname(HERE))

import dropr  # noqa: E402

project = "dropr"
author = "the dropr authors"
copyright = "the dropr authors"
release = dropr.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# docs/benchmarks.md is Markdown, written beside these pages; Sphinx reads
# only reStructuredText here (no Markdown parser is a dependency), so
# benchmarks.rst shows it as a literal block instead.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "benchmarks.md", "examples"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}

html_theme = "alabaster"
html_theme_options = {
    "description": "A store-and-forward message queue on the file system, on Twisted.",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []


# -- zope.interface ------------------------------------------------------------
#
# autodoc cannot document a zope.interface ``Interface``: it is an instance
# of ``InterfaceClass``, not a class, and its methods are ``Method`` objects.
# This directive writes the same reST autodoc would, from the interface's own
# names, signatures and docstrings, so the page follows the code:
#
#     .. zope-interface:: dropr.interfaces.IStorage

import importlib  # noqa: E402
import re  # noqa: E402

from docutils import nodes  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.util.docstrings import prepare_docstring  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402
from zope.interface.interface import Method  # noqa: E402


def _interface_lines(dotted: str) -> list[str]:
    module_name, _, name = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    iface = getattr(module, name)
    bases = ", ".join(f":class:`{b.__identifier__}`" for b in iface.__bases__)
    lines = [f".. py:class:: {name}", f"   :module: {module_name}", ""]
    lines += [f"   Bases: {bases}", ""]
    lines += ["   " + line for line in prepare_docstring(iface.__doc__ or "")]
    for member, description in iface.namesAndDescriptions(all=False):
        if isinstance(description, Method):
            lines.append(f"   .. py:method:: {member}{description.getSignatureString()}")
        else:
            lines.append(f"   .. py:attribute:: {member}")
        lines.append("")
        lines += ["      " + line for line in prepare_docstring(description.__doc__ or "")]
        lines.append("")
    return lines


class ZopeInterfaceDirective(SphinxDirective):
    """``.. zope-interface:: dotted.name``: document a zope Interface."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        dotted = self.arguments[0]
        source = f"<zope-interface {dotted}>"
        lines = StringList(_interface_lines(dotted), source)
        container = nodes.container()
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


def _interface_names_in_signatures(  # type: ignore[no-untyped-def]
    app, what, name, obj, options, signature, return_annotation
):
    """Write ``<InterfaceClass dropr.interfaces.IStorage>`` as ``IStorage``.

    autodoc renders an annotation it cannot name by its repr; an interface
    used as a type (``path: str | IStorage``) would otherwise read badly.
    """
    if signature is None and return_annotation is None:
        return None
    fix = re.compile(r"<InterfaceClass (?:[\w.]+\.)?(\w+)>")
    return (
        fix.sub(r"\1", signature) if signature else signature,
        fix.sub(r"\1", return_annotation) if return_annotation else return_annotation,
    )


# -- benchmarks.md -------------------------------------------------------------
#
# benchmarks.rst shows docs/benchmarks.md as a literal block.  That file is
# written by whoever runs the benchmarks; until it exists, say so instead of
# failing the build on a missing include.

BENCHMARKS_INCLUDE = ".. literalinclude:: benchmarks.md\n   :language: markdown\n"


def _benchmarks_without_figures(app, docname, source):  # type: ignore[no-untyped-def]
    path = os.path.join(HERE, "benchmarks.md")
    if docname == "benchmarks" and not os.path.exists(path):
        # A missing dependency keeps the page out of date, so it is read
        # again, with the figures, once the file appears.
        app.env.note_dependency(path)
        source[0] = source[0].replace(BENCHMARKS_INCLUDE, "*No figures are written down yet.*\n")


def setup(app):  # type: ignore[no-untyped-def]
    app.add_directive("zope-interface", ZopeInterfaceDirective)
    app.connect("source-read", _benchmarks_without_figures)
    app.connect("autodoc-process-signature", _interface_names_in_signatures)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
