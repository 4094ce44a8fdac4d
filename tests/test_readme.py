"""The README and docs/ stay honest: the two set-up commands, a short README, links that resolve,
commands and options that exist, and no process words (work diaries, clock times, issue
numbers, first person)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

#: words that describe how the product was made rather than what it is (case-insensitive)
PROCESS_WORDS = re.compile(
    r"\b(?:first|second|third|fourth|fifth|sixth|seventh|previous|earlier|later|last|next|this|that|"
    r"work|working|coding|debugging)\s+sessions?\b"
    r"|\bsession\s+\d+\b"
    r"|\b\d{1,2}:\d{2}(?::\d{2})?\s*UTC\b"
    r"|\bissues?\s+#?\d+\b"
    r"|#\d+\b"
    r"|\b(?:today|yesterday|tonight|this morning|this afternoon|this evening)\b"
    r"|\b(?:we|we're|we've|we'd|we'll|our|ours|ourselves|my|mine|myself)\b",
    re.IGNORECASE,
)
#: first person singular, case-sensitive ("i" is an index in code, "I/O" is not a person)
FIRST_PERSON = re.compile(r"(?<![\w/])I(?:'m|'ve|'d|'ll)?(?![\w/])")


def _process_words(text: str) -> list[str]:
    """``line N: 'word'`` for every process word in ``text``."""
    hits = sorted([*PROCESS_WORDS.finditer(text), *FIRST_PERSON.finditer(text)], key=lambda m: m.start())
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in hits]


def _pages() -> list[Path]:
    return [README, *DOCS]


def test_readme_commands_match_ci() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    demo, tests = (b.strip() for b in blocks[:2])
    assert "\n" not in demo and "\n" not in tests, "each of the first two blocks is one command"
    assert demo.endswith("edgeperceiver demo")
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert "-c constraints.txt" in demo and "-c constraints.txt" in tests  # CPU torch, pinned
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines < 400, f"README.md has {lines} lines; deep material belongs in docs/"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are code
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URLs and in-page anchors
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_no_process_words(page: Path) -> None:
    found = _process_words(page.read_text())
    assert not found, (
        f"{page.relative_to(ROOT)} describes how it was made, not what it is (present tense, "
        f"no sessions, clock times, issue numbers or first person): {found}"
    )


def test_process_words_pattern() -> None:
    bad = ["in the fourth session", "at 13:15 UTC", "see issue 5", "fixed in #12", "I measured it",
           "we tried", "our runtime", "measured today", "I've seen"]  # fmt: skip
    good = ["one session class per backend", "an InferenceSession", "1.6 us a node", "I/O bindings",
            "for i in range", "segment 1 runs first", "the last exit", "UTC date 2026-01-02"]  # fmt: skip
    assert all(_process_words(t) for t in bad), [t for t in bad if not _process_words(t)]
    assert not any(_process_words(t) for t in good), [t for t in good if _process_words(t)]


def _commands() -> dict[str, str]:
    """Every CLI command's --help text, by name."""
    pytest.importorskip("typer")
    from typer.main import get_command

    from edgeperceiver.cli import app

    group = get_command(app)
    ctx = group.make_context("edgeperceiver", ["--help"], resilient_parsing=True)
    out = {}
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        out[name] = " ".join(opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts))
    return out


def _code_lines(text: str) -> list[str]:
    """The lines of fenced code blocks and every inline `code` span."""
    lines: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        lines.extend(block.splitlines())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines.extend(re.findall(r"`([^`\n]+)`", prose))
    return lines


def test_documented_commands_and_options_exist() -> None:
    """Every `edgeperceiver CMD --opt` in README.md's and docs/' code names a real command and option."""
    commands = _commands()
    stale = []
    for page in _pages():
        for line in _code_lines(page.read_text()):
            for m in re.finditer(r"(?<![\w.])edgeperceiver ([a-z][a-z-]*)\b([^#|]*)", line):
                name, rest = m.group(1), m.group(2)
                if name not in commands:
                    stale.append(f"{page.name}: unknown command {name!r} in {line.strip()!r}")
                    continue
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    if opt not in commands[name].split() and opt != "--help":
                        stale.append(f"{page.name}: {name} has no option {opt} ({line.strip()!r})")
    assert not stale, "\n".join(stale)


#: a path into the repository as docs name it (patterns like ``openvino_*.py`` are skipped)
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:edgeperceiver|targets|calibration|tests|scripts|benchmarks|docs|\.ci)/[\w./*<>{},-]*)"
)


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_named_files_exist(page: Path) -> None:
    """Every repository file named in `code` (edgeperceiver/x.py, targets/, tests/...) exists."""
    missing = []
    for span in re.findall(r"`([^`\n]+)`", page.read_text()):
        for path in REPO_PATH.findall(span):
            path = path.rstrip(".,")
            if any(c in path for c in "*<>{},"):
                continue  # a pattern, not a file
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {sorted(set(missing))}"
