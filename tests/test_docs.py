"""The documentation's promises that `mkdocs build --strict` does not check: every public name of
the analysis API has a docstring, and the README links only to pages that exist."""

import inspect
import re

import analysis
from tests.conftest import ROOT


def test_every_public_name_of_the_analysis_api_has_a_docstring():
    missing = [name for name in analysis.__all__ if not inspect.getdoc(getattr(analysis, name))]
    assert not missing, f"no docstring: {missing}"
    for name in analysis.__all__:  # and the public methods of its classes
        value = getattr(analysis, name)
        if inspect.isclass(value) and value.__module__.startswith("analysis"):
            bare = [
                f"{name}.{m}"
                for m, member in vars(value).items()
                if not m.startswith("_") and callable(member) and not inspect.getdoc(member)
            ]
            assert not bare, f"no docstring: {bare}"


def test_the_readme_links_only_to_pages_that_exist_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    broken = [link for link in links if not (ROOT / link).is_file()]
    assert links and not broken, broken
    assert len(readme.splitlines()) <= 250
