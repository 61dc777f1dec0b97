"""The docs stay true: the README is a door (at most 300 lines, linking every docs page and only existing ones), every
page is in the site's navigation, the strict mkdocs build passes, and the CPU commands the pages show run.

A command the docs promise is written in a fenced ```console block as `$ COMMAND`; the lines after it, up to the next
`$`, are output that must appear, in that order, among the lines the command prints (stdout and stderr; `...` alone
skips, `...` inside a line matches anything). `# exits N` after a command expects that exit status (default 0). Each
block runs in a fresh temporary directory that holds a link to the checkout's `tests/` (for the fixtures), with the
checkout first on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 300
# Pages other branches add (the README's map and mkdocs.yml's commented nav lines already name them); a link to one
# of them may point nowhere until it is merged.
PENDING: set[str] = set()  # pages linked before they land (none now)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CONSOLE = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _local_links(text: str) -> list[str]:
    return [m for m in LINK.findall(text) if not re.match(r"[a-z]+:|#", m)]


def test_readme_is_a_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move sections into docs/ pages"
    links = _local_links(text)
    targets = set()
    for link in links:
        path = link.split("#")[0]
        assert path.startswith("docs/") and path.endswith(".md"), f"README.md links to {link}, not a docs/ page"
        name = path[len("docs/"):]
        assert (DOCS / name).is_file() or name in PENDING, f"README.md links to {link}, which does not exist"
        targets.add(name)
    missing = [p.name for p in _pages() if p.name not in targets]
    assert not missing, f"the README's map does not link {missing}"


def test_every_page_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, re.M))
    missing = [p.name for p in _pages() if p.name not in listed]
    assert not missing, f"mkdocs.yml's nav leaves out {missing}"
    for name in PENDING:
        named = re.search(rf"^\s*#?\s*-\s*[^:\n]+:\s*{re.escape(name)}\s*$", nav, re.M)
        assert named, f"mkdocs.yml does not name {name}"


def test_mkdocs_strict_build(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[test]')")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "use_the_model.png").is_file()


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in [README, *_pages()]:
        for i, m in enumerate(CONSOLE.finditer(page.read_text())):
            found.append((page.relative_to(ROOT).as_posix(), i, m.group(1)))
    return found


def _steps(block: str) -> list[tuple[str, int, list[str]]]:
    """[(command, expected exit status, expected output lines)]"""
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            command = line[2:]
            m = EXITS.search(command)
            steps.append((command, int(m.group(1)) if m else 0, []))
        elif line.strip():
            assert steps, f"output before the first command: {line!r}"
            steps[-1][2].append(line.strip())
    return steps


def _matches(expected: str, got: str) -> bool:
    if "..." not in expected:
        return expected == got
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("...")), got) is not None


def test_docs_have_console_blocks():
    pages = {page for page, _, _ in _blocks()}
    assert {"docs/data.md", "docs/grid.md", "docs/converting.md", "docs/errors.md"} <= pages


@pytest.mark.parametrize("page,block", [pytest.param(p, b, id=f"{p}:{i}") for p, i, b in _blocks()])
def test_console_block_runs(page, block, tmp_path):
    os.symlink(ROOT / "tests", tmp_path / "tests")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for command, status, expected in _steps(block):
        argv = shlex.split(command, comments=True)
        assert argv[0] == "python", f"{page}: only `python ...` commands run here, got {command!r}"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        printed = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines()]
        assert proc.returncode == status, f"{page}: `{command}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        at = 0
        for line in expected:
            if line == "...":
                continue
            hit = next((j for j in range(at, len(printed)) if _matches(line, printed[j])), None)
            assert hit is not None, f"{page}: `{command}` did not print {line!r} (in order); it printed:\n" + \
                "\n".join(printed[:60])
            at = hit + 1
