"""Sphinx configuration of the gradsurgery documentation.

HTML (what CI checks, warnings are errors, every cross-reference must resolve):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

Every code example of the docs (and of the docstrings that autodoc pulls in):

    sphinx-build -W --keep-going -n -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))  # document the checkout, not whatever is installed

import gradsurgery  # noqa: E402

# -- project -------------------------------------------------------------------------------
project = "gradsurgery"
author = "The gradsurgery developers"
copyright = "2026, the gradsurgery developers"
release = gradsurgery.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax shipped with the site: formulas render offline too
    "sphinx.ext.viewcode",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
    "gsdocs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "**/README.md",
]
nitpicky = True
default_role = "py:obj"

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"gradsurgery {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {
    "source_repository": "https://github.com/gradsurgery/gradsurgery/",
    "source_branch": "main",
    "source_directory": "docs/",
}
pygments_style = "friendly"
pygments_dark_style = "monokai"

# -- autodoc + napoleon: numpy-style docstrings, types from the docstrings and hints -------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_preprocess_types = True
# Short names of the docstrings' type lines, and the objects they mean.
napoleon_type_aliases = {
    "Tensor": "torch.Tensor",
    "module": "torch.nn.Module",
}

# External objects: the build has no network, so there is no intersphinx inventory of
# Python or PyTorch. These names render as text; every gradsurgery name must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"torch(\..*)?"),
    (r"py:.*", r"(int|float|bool|str|dict|list|tuple|type|object|None)"),
    (r"py:.*", r"(Any|Callable|Iterable|Sequence|collections\.abc\..*|typing\..*)"),
    (r"py:.*", r"(ValueError|TypeError|KeyError)"),
    (r"py:class", r"(sequence|iterable|optional|module)"),
    # Sphinx 9 renders some torch annotations as quoted forward references: still torch names.
    (r"py:class", r"(TypeAliasForwardRef|'torch\..*')"),
]

# -- doctest: every example of the docs runs --------------------------------------------------
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
)
doctest_global_setup = """
import torch
torch.set_num_threads(1)
"""

# -- plots made at build time --------------------------------------------------------------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 130)]
plot_rcparams = {"figure.autolayout": False, "savefig.bbox": "tight"}

# -- MyST (Markdown pages: the changelog, the study and benchmark results) -----------------
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3


# -- wide figures -------------------------------------------------------------------------------
# The study's figures (report.py) put four panels in a row, 2400 x 480 px: squeezed to the text
# column, their labels would be a few pixels high. Every image wider than the column links to
# its full-size file (Sphinx links the images it scales, hence scale 100), and the widest are
# shown by custom.css at a readable width in a frame that scrolls sideways.
COLUMN_PX = 800
WIDE_FIGURE_PX = 1600


def _link_wide_images(app, doctree, docname):
    import imagesize
    from docutils import nodes

    for image in doctree.findall(nodes.image):
        path = Path(app.srcdir, image["uri"])
        if "scale" in image or not path.is_file():
            continue
        width, _ = imagesize.get(path)
        if width > COLUMN_PX:
            image["scale"] = 100
        if width >= WIDE_FIGURE_PX:
            image["classes"].append("gs-wide-figure")


def setup(app):
    app.connect("doctree-resolved", _link_wide_images)
