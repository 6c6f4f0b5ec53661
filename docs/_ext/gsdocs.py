"""A Sphinx directive of the gradsurgery docs: include generated results when they exist.

``include-results`` (in Markdown pages) includes the committed Markdown files matching a path
or glob relative to the page (the study's ``results.md``, the benchmark tables), with their
images, or shows the directive's own content when no file matches::

    :::{include-results} ../../examples/lunarlander_mtl/results/results.md
    :heading-offset: 2
    Fallback text, shown when no file matches.
    :::
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

__all__ = ["setup"]

logger = logging.getLogger(__name__)


class IncludeResults(SphinxDirective):
    """Include the Markdown files matching a glob, or parse the fallback content."""

    required_arguments = 1
    has_content = True
    option_spec: ClassVar[dict] = {"heading-offset": directives.nonnegative_int}

    def run(self) -> list[nodes.Node]:
        page_dir = Path(self.env.doc2path(self.env.docname)).parent
        matches = sorted(Path(p) for p in glob.glob(str(page_dir / self.arguments[0])))
        container = nodes.container(classes=["gs-results"])
        if not matches:
            logger.info(
                "include-results: nothing matches %s in %s; showing the fallback",
                self.arguments[0],
                self.env.docname,
            )
            self.state.nested_parse(self.content, self.content_offset, container)
            return [container]
        offset = self.options.get("heading-offset", 0)
        lines = []
        for path in matches:
            self.env.note_dependency(str(path))
            relative = Path(os.path.relpath(path, page_dir)).as_posix()
            lines += [
                f"```{{include}} {relative}",
                ":relative-images:",
                f":heading-offset: {offset}",
                "```",
                "",
            ]
        self.state.nested_parse(lines, self.content_offset, container, match_titles=True)
        return container.children


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("include-results", IncludeResults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
