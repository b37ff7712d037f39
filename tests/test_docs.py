"""The docs stay true to the code: the config reference is what ``flowrl config-doc`` prints now,
the README stays short, and every relative link in README.md and docs/*.md names a file that exists.

docs/config.md is generated; after changing a config key, rewrite it with

    .venv/bin/python tests/test_docs.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "config.md"
README_MAX_LINES = 300
REGENERATE = ".venv/bin/python tests/test_docs.py"

CONFIG_DOC_HEADER = f"""\
# Configuration reference

Generated from the config schema (`flowrl/config.py`) by `flowrl config-doc`; do not edit it by
hand. After changing a key, regenerate it with `{REGENERATE}`; `tests/test_docs.py`
fails while it is stale. Each entry is `section.key = default`, then what the key means. A scenario
is one YAML file with these sections; `flowrl validate --config FILE` checks one, and every stage
command takes `--set KEY=VALUE` to change a key after reading the file.

```text
"""
CONFIG_DOC_FOOTER = "```\n"

# [text](target) and [text]: target; images too. Angle-bracketed targets are unwrapped.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def config_doc_output() -> str:
    """What ``flowrl config-doc`` prints, run as the console script runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "flowrl.cli", "config-doc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def render_config_doc(output: str) -> str:
    """docs/config.md for one ``flowrl config-doc`` output."""
    return CONFIG_DOC_HEADER + output + ("" if output.endswith("\n") else "\n") + CONFIG_DOC_FOOTER


def relative_links(markdown: str) -> list[str]:
    """Link targets that point into the repository (no scheme, no bare anchor), code blocks left out."""
    prose = FENCE.sub("", markdown)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is not a link
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of one page whose file is missing or lies outside ``root``."""
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(target)
    return broken


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_doc_is_current():
    expected = render_config_doc(config_doc_output())
    actual = CONFIG_DOC.read_text(encoding="utf-8") if CONFIG_DOC.exists() else ""
    assert actual == expected, f"docs/config.md is stale: regenerate it with `{REGENERATE}`"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_relative_links_resolve():
    broken = {str(p.relative_to(ROOT)): broken_links(p) for p in markdown_files()}
    assert {name: targets for name, targets in broken.items() if targets} == {}


def test_no_citations_outside_the_repository():
    """DESIGN.md and STYLE.md live outside the repository; what the code needs from them is docs/design.md."""
    offenders = []
    for folder in ("flowrl", "tasks", "pipelines", "tests", "docs", "bench", "experiments", "configs", "images"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".md", ".yaml", ".mk"} and path != Path(__file__).resolve():
                text = path.read_text(encoding="utf-8")
                offenders += [f"{path.relative_to(ROOT)}: {name}" for name in ("DESIGN.md", "STYLE.md") if name in text]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    offenders += [f"README.md: {name}" for name in ("DESIGN.md", "STYLE.md") if name in readme]
    assert offenders == [], "cite docs/design.md (its section headings) instead"


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) [gone](missing.md#part) [web](https://example.com) [anchor](#x)\n"
        "`[not a link](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n[ref]: other/missing.txt\n"
    )
    assert relative_links(page.read_text()) == ["page.md", "missing.md#part", "other/missing.txt"]
    assert broken_links(page, root=tmp_path) == ["missing.md#part", "other/missing.txt"]
    assert broken_links(page, root=tmp_path / "sub") == [f"{t} (outside the repository)" for t in relative_links(page.read_text())]


if __name__ == "__main__":
    CONFIG_DOC.write_text(render_config_doc(config_doc_output()), encoding="utf-8")
    print(f"wrote {CONFIG_DOC.relative_to(ROOT)}")
