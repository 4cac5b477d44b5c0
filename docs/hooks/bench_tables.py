"""MkDocs hook: put the README's generated speed tables into the benchmarks page.

benchmarks/report.py writes the tables into README.md between ``<!-- bench:start -->`` and
``<!-- bench:end -->``; a page that contains the line ``<!-- bench-tables -->`` gets that text,
so the site never holds a number typed by hand.
"""

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
PLACEHOLDER = "<!-- bench-tables -->"


def bench_tables() -> str:
    """The README's text between the bench markers; ValueError when a marker is missing."""
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{README}: the markers {start} and {end} are missing")
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (MkDocs' signature)
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, bench_tables())
    return markdown
