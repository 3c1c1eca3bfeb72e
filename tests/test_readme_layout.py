"""The README's project map names only paths that exist (it cannot drift from the tree)."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def layout_paths() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Project layout", 1)[1]
    block = section.split("```", 2)[1]
    paths, package = [], ""
    for line in block.splitlines():
        match = re.match(r"^(\s*)(\S+)\s", line + " ")
        if not match or not re.search(r"[./]", match.group(2)):
            continue
        indent, name = match.groups()
        if not indent:  # a top-level entry; "pdm_lightning/" opens the package
            package = name if name == "pdm_lightning/" else ""
            paths.append(name)
        elif len(indent) == 2 and package:
            paths.append(package + name)
    return paths


def test_every_path_in_the_readme_layout_exists() -> None:
    paths = layout_paths()
    assert len(paths) > 40  # the map was found and read
    missing = [path for path in paths if not (REPO_ROOT / path).exists()]
    assert not missing, f"README's Project layout names paths that do not exist: {missing}"


def test_every_package_module_is_in_the_readme_layout() -> None:
    named = set(layout_paths())
    modules = sorted(REPO_ROOT.glob("pdm_lightning/**/*.py"))
    unnamed = [
        str(path.relative_to(REPO_ROOT)) for path in modules
        if path.name != "__init__.py" or path.parent.name == "prepare"
        if str(path.relative_to(REPO_ROOT)) not in named
        and f"{path.parent.relative_to(REPO_ROOT)}/" not in named  # a package named as a whole
    ]
    assert not unnamed, f"README's Project layout does not name: {unnamed}"
