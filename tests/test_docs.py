"""The repository's notes live in docs/ and the code's pointers into them stay valid.

1. No file outside docs/ refers to the notes and checks that once lived beside the repository (a parent
   folder named "shared"): the repository must stand on its own.
2. The algorithm and host notes are named by their place in the repository, docs/<NAME>.md, and exist.
3. Every pointer of the form "docs/<NAME>.md section N" (or "section N.M", or "section N, decision K")
   names a numbered heading (or decision) that exists in that document.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIPPED_DIRS = {"build", "dist", "runs", "__pycache__"}
BINARY_SUFFIXES = (".so", ".pyc", ".o", ".png", ".jpg", ".jpeg", ".safetensors", ".pt", ".npz", ".whl", ".gz")
NOTES = ("ALGORITHM", "COMFYUI", "DESIGN")  # notes the code has pointed at; DESIGN was never brought in
# spelled in pieces so that this file does not match itself
FORBIDDEN = ("../" + "shared", "shared" + "/checks", "shared" + "/docs")
POINTER = re.compile(r"docs/([\w.-]+\.md)[)\]`]*,?\s+section\s+(\d+(?:\.\d+)*)(?:,\s*decision\s+(\d+))?")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)[.\s]")
DECISION = re.compile(r"^(\d+)\.\s")


def checkout_files() -> list[Path]:
    """Tracked and not-ignored files (uncommitted work included); without git, a walk of the tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode == 0:
        names = [n for n in listed.stdout.decode().split("\0") if n]
        paths = [ROOT / n for n in names]
    else:
        paths = [p for p in ROOT.rglob("*")
                 if not any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info")
                            for part in p.relative_to(ROOT).parts[:-1])]
    return sorted(p for p in paths if p.is_file() and not p.name.endswith(BINARY_SUFFIXES))


def text_files() -> dict[str, str]:
    out = {}
    for path in checkout_files():
        try:
            out[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return out


def sections(doc: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The numbered headings of a document ("2", "4.1", ...) and, per section, its numbered list items."""
    found: set[str] = set()
    items: dict[str, set[str]] = {}
    current = None
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        match = HEADING.match(line)
        if match:
            current = match.group(1)
            found.add(current)
            items.setdefault(current.split(".")[0], set())
            continue
        item = DECISION.match(line)
        if item and current is not None:
            items[current.split(".")[0]].add(item.group(1))
    return found, items


def test_nothing_outside_docs_refers_to_the_old_shared_folder():
    offenders = [f"{name}:{n}: {line.strip()}" for name, text in text_files().items() if not name.startswith("docs/")
                 for n, line in enumerate(text.splitlines(), 1) if any(f in line for f in FORBIDDEN)]
    assert not offenders, "the repository must not depend on a folder beside it:\n" + "\n".join(offenders)


def test_notes_are_named_by_their_path_and_exist():
    bare = re.compile(r"(?<![\w/])(" + "|".join(NOTES) + r")\.md")
    named = re.compile(r"docs/(" + "|".join(NOTES) + r")\.md")
    offenders = []
    for name, text in text_files().items():
        for n, line in enumerate(text.splitlines(), 1):
            offenders += [f"{name}:{n}: {m.group(0)} (write docs/{m.group(0)})" for m in bare.finditer(line)]
            offenders += [f"{name}:{n}: {m.group(0)} does not exist" for m in named.finditer(line)
                          if not (ROOT / m.group(0)).is_file()]
    assert not offenders, "\n".join(offenders)


def test_every_section_pointer_names_an_existing_section():
    pointers = 0
    offenders = []
    cache: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
    for name, text in text_files().items():
        for match in POINTER.finditer(text):
            pointers += 1
            doc, section, decision = match.groups()
            line = text.count("\n", 0, match.start()) + 1
            path = DOCS / doc
            if not path.is_file():
                offenders.append(f"{name}:{line}: {match.group(0)}: docs/{doc} does not exist")
                continue
            found, items = cache.setdefault(doc, sections(path))
            if section not in found:
                have = ", ".join(sorted(found, key=lambda s: [int(p) for p in s.split(".")]))
                offenders.append(f"{name}:{line}: {match.group(0)}: no section {section} in docs/{doc} (it has {have})")
            elif decision is not None and decision not in items.get(section, set()):
                offenders.append(f"{name}:{line}: {match.group(0)}: section {section} has no item {decision}")
    assert not offenders, "\n".join(offenders)
    assert pointers >= 10, f"only {pointers} pointers found: is the pattern still right?"


def test_the_heading_parser_reads_the_notes():
    found, items = sections(DOCS / f"{NOTES[0]}.md")
    assert {"1", "2", "3", "4", "4.2", "5", "6", "7", "8", "9", "10"} <= found
    assert "5" in items["10"]  # decision 5: sigma_init
    found, _ = sections(DOCS / f"{NOTES[1]}.md")
    assert {str(n) for n in range(1, 10)} <= found


TEST_REF = re.compile(r"(tests/[\w/]+\.py)?::(test_\w+)")


def test_every_test_the_notes_name_exists():
    """"Tested: tests/x.py::test_y" (and a following "::test_z", in the same file) names a test that exists."""
    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        current = None
        for m in TEST_REF.finditer(doc.read_text(encoding="utf-8")):
            current = m.group(1) or current
            path = ROOT / current if current else None
            if path is None or not path.is_file() or not re.search(rf"def {m.group(2)}\b", path.read_text("utf-8")):
                missing.append(f"{doc.name}: {current}::{m.group(2)}")
    assert missing == []
