"""The repository stands alone: no tracked file points at a path outside it.

A user clones the repository with nothing beside it, so a document, docstring, comment or test
that refers to a sibling folder (or to a notes file that only exists there) is a dead reference.
The method is documented in docs/method.md; DreamBench paths are given by the user.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Built from parts, so this file does not match itself.
_SHARED = "sha" + "red"
FORBIDDEN = {
    ".." + "/" + _SHARED: "a path into a folder beside the repository",
    ".." + "\\" + _SHARED: "a path into a folder beside the repository",
    "/work" + "/" + _SHARED: "an absolute path of the development machine",
    "METHOD" + ".md": "a notes file outside the repository (document the method in docs/method.md)",
    f'"{_SHARED}" / "dream' + 'bench"': "a DreamBench folder found by climbing out of the repository",
    f"'{_SHARED}' / 'dream" + "bench'": "a DreamBench folder found by climbing out of the repository",
}
# Path(__file__)...parents[N] or a chain of .parent: where it leads depends on the file's depth.
_PARENTS_INDEX = re.compile(r"\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"(?:\.parent(?![s\w]))+")


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("git or the .git folder is not available: cannot list the tracked files.")
    result = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"git ls-files failed: {result.stderr.decode(errors='replace').strip()}")
    return [name for name in result.stdout.decode("utf-8", errors="surrogateescape").split("\0") if name]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary (NUL bytes or not UTF-8), a missing file or a non-file."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None  # e.g. deleted in the working tree but not yet from the index
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def climbs_out(line: str, depth: int) -> str | None:
    """Why ``line`` climbs above the repository root from a file ``depth`` folders deep, else None.

    ``Path(__file__).parents[depth]`` is the repository root; a higher index leaves it. The same
    for ``.parent`` chains: ``depth + 1`` of them reach the root.
    """
    if "__file__" not in line:
        return None
    for match in _PARENTS_INDEX.finditer(line):
        if int(match.group(1)) > depth:
            return f"parents[{match.group(1)}] of a file {depth} folder(s) deep leaves the repository"
    for match in _PARENT_CHAIN.finditer(line):
        count = match.group(0).count(".parent")
        if count > depth + 1:
            return f"{count} x .parent of a file {depth} folder(s) deep leaves the repository"
    return None


def find_outside_references(root: Path, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        text = read_text(root / name)
        if text is None:
            continue
        depth = name.count("/")
        for number, line in enumerate(text.splitlines(), start=1):
            for needle, why in FORBIDDEN.items():
                if needle in line:
                    problems.append(f"{name}:{number}: {needle!r} ({why}): {line.strip()[:120]}")
            if name.endswith(".py"):
                why = climbs_out(line, depth)
                if why:
                    problems.append(f"{name}:{number}: {why}: {line.strip()[:120]}")
    return problems


def test_no_tracked_file_refers_outside_the_repository() -> None:
    names = tracked_files()
    assert names, "git ls-files listed no files"
    problems = find_outside_references(REPO_ROOT, names)
    assert not problems, "References to paths outside the repository:\n" + "\n".join(problems)


def test_the_method_document_is_tracked() -> None:
    names = tracked_files()
    if "docs/method.md" not in names:
        # Not yet added to the index: it must at least exist in the working tree.
        assert (REPO_ROOT / "docs" / "method.md").is_file(), "docs/method.md is missing"


def test_the_checker_finds_each_kind_of_reference(tmp_path: Path) -> None:
    here = "Path(" + "__fi" + "le__)"  # spelled in parts: these sample lines must not flag this file
    lines = {
        "README.md": "see .." + "/" + _SHARED + "/notes.md",
        "docs/a.md": "as in METHOD" + ".md",
        "tests/test_a.py": f'DATA = {here}.resolve().parents[1] / "{_SHARED}" / "dream' + 'bench"',
        "tests/test_b.py": f"DATA = {here}.resolve().parents[2] / 'data'",
        "tests/test_c.py": f"DATA = {here}.parent.parent.parent / 'data'",
        "tests/test_ok.py": f"ROOT = {here}.resolve().parents[1]\nHERE = {here}.parent.parent",
        "pkg/sub/mod.py": f"ROOT = {here}.resolve().parents[2]",
        "image.png": "\0" + "METHOD" + ".md",
    }
    for name, text in lines.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = find_outside_references(tmp_path, list(lines))
    flagged = {problem.split(":")[0] for problem in problems}
    assert flagged == {"README.md", "docs/a.md", "tests/test_a.py", "tests/test_b.py", "tests/test_c.py"}
