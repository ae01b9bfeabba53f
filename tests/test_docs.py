"""Every document the repository cites is in the repository, and every cited section of docs/ exists.

A maintainer reading a comment such as "(docs/runtime.md §4.3)" must find that page and that heading. Web
addresses are not checked (they name upstream files), and neither are bare "§N" references without a file name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

MARKDOWN = ".md"

# Upstream references: a Markdown link to a web address (its text included, which often names the upstream file)
# and any bare web address.
MARKDOWN_WEB_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?https?://[^)\s>]*>?\s*\)")
WEB_ADDRESS = re.compile(r"https?://[^\s)>\]\"'`]+")
# A comment wrapped over two lines ("(docs/runtime.md\n# §7)") is read as one line.
LINE_BREAK = re.compile(r"[ \t]*\n[ \t]*(?:#+|//|/?\*+)?[ \t]*")
# A Markdown link to a file of the repository: a renderer resolves it from the page's own folder.
RELATIVE_LINK = re.compile(r"\]\(\s*<?(?P<target>(?!https?:|mailto:|#)[^)\s>#]+)(?:#[^)\s>]*)?>?\s*\)")

DOCUMENT_NAME = re.compile(r"(?<![\w/.\-])((?:[\w.\-]+/)*[\w\-]+\.md)(?![\w\-])")
DOCS_PATH = re.compile(r"(?<![\w/.\-])(docs/[\w./\-]*[\w\-])")
AFTER_NAME = re.compile(r"`?,?[ \t]*")
# What may follow a page name: "§4.3", "§8 item 5", "Appendix A", "decision 5", a quoted title (after a space or a
# comma: a quote right after the name closes a string), and after a section a bare number that continues a range
# ("§2.3-2.4").
REFERENCE = re.compile(
    r"""
    §[ ]?(?P<section>\d+(?:\.\d+)*)(?:[ ]+items?[ ]+(?P<item>\d+))?
    | Appendix[ ]+(?P<appendix>[A-Z])(?![\w])
    | decisions?[ ]+(?P<decision>\d+)
    | (?<=[\s,])"(?P<quote>[^"\n]{1,80})"
    | (?P<bare>\d+(?:\.\d+)*)(?![\w.])
    """,
    re.VERBOSE,
)
SEPARATOR = re.compile(r"[ \t]*(?:,|-|\u2013|\u2014|\band\b)[ \t]*")  # comma, hyphen, en and em dash, "and"
HEADING = re.compile(r"^#{1,6}[ \t]+(?P<title>.+)$", re.MULTILINE)
NUMBERED_ITEM = r"^[ \t]*{number}\.[ \t]"


def tracked_files(root: Path) -> list[PurePosixPath]:
    """Files under version control: a citation must point at one of them, not at a local leftover."""
    git = shutil.which("git")
    assert git is not None, "git is needed to list the repository's tracked files"
    listing = subprocess.run([git, "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return [PurePosixPath(name) for name in listing.stdout.decode("utf-8").split("\0") if name]


def scanned_text(path: Path) -> str | None:
    """The file's text without web addresses, with wrapped comment lines joined; None for a binary file."""
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = MARKDOWN_WEB_LINK.sub(" ", text)
    text = WEB_ADDRESS.sub(" ", text)
    return LINE_BREAK.sub(" ", text)


def plain(text: str) -> str:
    """Lower-case text without code marks and with single spaces, for comparing quoted titles."""
    return " ".join(text.replace("`", "").lower().split())


def normalised(path: PurePosixPath) -> PurePosixPath | None:
    """`path` with `.` and `..` resolved, or None when it leaves the repository."""
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts)


@dataclass(frozen=True)
class Repository:
    """The tracked files and the text to scan, read once per test."""

    root: Path
    files: frozenset[PurePosixPath] = field(repr=False)
    folders: frozenset[PurePosixPath] = field(repr=False)
    basenames: frozenset[str] = field(repr=False)
    texts: dict[PurePosixPath, str] = field(repr=False)


@pytest.fixture
def repository(repo_root: Path) -> Repository:
    """Every tracked text file is scanned: code and pages, but also the Dockerfile, units, rules and model files."""
    files = tracked_files(repo_root)
    texts: dict[PurePosixPath, str] = {}
    for name in files:
        path = repo_root / name
        if path.is_file() and not path.is_symlink() and (text := scanned_text(path)) is not None:
            texts[name] = text
    return Repository(
        root=repo_root,
        files=frozenset(files),
        folders=frozenset(folder for name in files for folder in name.parents),
        basenames=frozenset(name.name for name in files),
        texts=texts,
    )


def resolve(repository: Repository, citing: PurePosixPath, cited: str) -> PurePosixPath | None:
    """The tracked file a cited path names, from the citing file's folder or the repository root.

    A bare name that is in neither folder (rkllm_native/selfcheck.py citing HISTORY.md) names the only tracked file
    with that name.
    """
    for base in (citing.parent, PurePosixPath()):
        if (path := normalised(base / cited)) in repository.files:
            return path
    if "/" not in cited:
        matches = [name for name in repository.files if name.name == cited]
        if len(matches) == 1:
            return matches[0]
    return None


def test_every_cited_document_is_in_the_repository(repository: Repository) -> None:
    missing: list[str] = []
    for citing, text in sorted(repository.texts.items()):
        cited = {match[1] for match in DOCUMENT_NAME.finditer(text)}
        cited |= {match[1].rstrip(".") for match in DOCS_PATH.finditer(text)}
        missing.extend(f"{citing}: {name}" for name in sorted(cited) if resolve(repository, citing, name) is None)
    assert not missing, "references to documents that are not tracked files:\n" + "\n".join(missing)


def test_every_relative_link_of_a_page_reaches_a_tracked_file(repository: Repository) -> None:
    broken: list[str] = []
    for page in sorted(name for name in repository.files if name.suffix == MARKDOWN):
        text = (repository.root / page).read_text(encoding="utf-8")
        for match in RELATIVE_LINK.finditer(text):
            target = normalised(page.parent / match["target"])
            if target is None or (target not in repository.files and target not in repository.folders):
                broken.append(f"{page}: ({match['target']})")
    assert not broken, "links that do not reach a tracked file or folder:\n" + "\n".join(broken)


@dataclass(frozen=True)
class Page:
    """A page of docs/: its headings and its text, as a citation is checked against them."""

    headings: list[str]
    text: str

    def has_section(self, number: str) -> bool:
        marker = re.compile(rf"§{re.escape(number)}(?![\d]|\.\d)")
        return any(marker.search(heading) for heading in self.headings)

    def has_subsections(self, number: str) -> bool:
        return any(f"§{number}." in heading for heading in self.headings)

    def has_appendix(self, letter: str) -> bool:
        marker = re.compile(rf"\bAppendix {letter}(?![\w])")
        return any(marker.search(heading) for heading in self.headings)

    def has_decision(self, number: str) -> bool:
        """A numbered item under a heading that names decisions."""
        for match in HEADING.finditer(self.text):
            if "decision" not in match["title"].lower():
                continue
            following = self.text[match.end() :]
            next_heading = re.search(r"^#{1,2}[ \t]", following, re.MULTILINE)
            section = following[: next_heading.start()] if next_heading else following
            if re.search(NUMBERED_ITEM.format(number=number), section, re.MULTILINE):
                return True
        return False

    def has_phrase(self, phrase: str) -> bool:
        return plain(phrase) in plain(self.text)


def read_page(path: Path) -> Page:
    text = path.read_text(encoding="utf-8")
    return Page(headings=[match["title"] for match in HEADING.finditer(text)], text=text)


def cited_references(text: str, start: int) -> list[re.Match[str]]:
    """The references right after a page name: `§4.3`, `§2-§3`, `§7, Appendix A`, `decision 5`, `"title"`."""
    references: list[re.Match[str]] = []
    position = start
    while True:
        if references:
            separator = SEPARATOR.match(text, position)
            if separator is None:
                break
            position = separator.end()
        match = REFERENCE.match(text, position)
        if match is None:
            break
        after_section = bool(references) and references[-1]["section"] is not None
        if match["bare"] is not None and not after_section:
            break  # a bare number only continues a range such as "§2.3-2.4"
        references.append(match)
        position = match.end()
    return references


def check_reference(page: Page, reference: re.Match[str]) -> str | None:
    """What is wrong with one reference to `page`, or None."""
    if (number := reference["section"] or reference["bare"]) is not None:
        if not page.has_section(number):
            return f"no heading §{number}"
        item = reference["item"]
        if item is not None and page.has_subsections(number) and not page.has_section(f"{number}.{item}"):
            return f"§{number} has subsections but none for item {item} (§{number}.{item})"
    elif reference["appendix"] is not None and not page.has_appendix(reference["appendix"]):
        return f"no heading Appendix {reference['appendix']}"
    elif reference["decision"] is not None and not page.has_decision(reference["decision"]):
        return f"no decision {reference['decision']}"
    elif reference["quote"] is not None and not page.has_phrase(reference["quote"]):
        return f'no text "{reference["quote"]}"'
    return None


def test_every_cited_section_of_docs_exists(repository: Repository) -> None:
    pages: dict[PurePosixPath, Page] = {}
    problems: list[str] = []
    for citing, text in sorted(repository.texts.items()):
        for citation in DOCUMENT_NAME.finditer(text):
            path = resolve(repository, citing, citation[1])
            if path is None or path.parent != PurePosixPath("docs"):
                continue  # missing ones are reported by test_every_cited_document_is_in_the_repository
            page = pages.setdefault(path, read_page(repository.root / path))
            after_name = AFTER_NAME.match(text, citation.end())
            assert after_name is not None  # the pattern also matches nothing
            for reference in cited_references(text, after_name.end()):
                problem = check_reference(page, reference)
                if problem is not None:
                    problems.append(f"{citing}: {path} {reference[0]}: {problem}")
    assert not problems, "citations of sections that do not exist:\n" + "\n".join(problems)


def test_docs_index_lists_every_page(repository: Repository) -> None:
    index = (repository.root / "docs" / "README.md").read_text(encoding="utf-8")
    pages = sorted(
        name.name
        for name in repository.files
        if name.parent == PurePosixPath("docs") and name.suffix == MARKDOWN and name.name != "README.md"
    )
    unlisted = [name for name in pages if f"({name})" not in index]
    assert not unlisted, f"docs/README.md does not link to: {', '.join(unlisted)}"


# An absolute path of the machine a file was written on: its work tree, root's or a user's home, or a temporary
# directory with a random name (tempfile's "tmp…", pytest's "pytest-of-…"). A path a user types on a board
# (under /opt/rkllm, /etc/rkllm, /usr/lib, /dev, /sys) is an example, not a leftover, and is not matched; neither is a
# placeholder such as "/home/<user>" or "~/rkllm", nor a path inside a web address (removed before the scan).
FOREIGN_PATH = re.compile(
    r"(?<![\w.~/\-$])/(?:(?:work|root|home)/[\w.\-]+|tmp/(?:tmp[\w\-]{4,}|pytest-of-[\w\-]+))",
)


def test_no_tracked_file_names_a_path_of_the_machine_it_was_written_on(repository: Repository) -> None:
    """Pasted outputs and fixtures must work on a fresh clone: a reader has neither this machine's paths nor its files.

    A document or test that names one either shows a reader a path that means nothing to them or reads a file only
    that machine has; the repository's own files are named relative to its root, examples with neutral paths
    (`~/rkllm/...`, `/path/to/...`).
    """
    found = [
        f"{name}: {match[0]}"
        for name, text in sorted(repository.texts.items())
        for match in FOREIGN_PATH.finditer(text)
    ]
    assert not found, "absolute paths of a particular machine in tracked files:\n" + "\n".join(found)
