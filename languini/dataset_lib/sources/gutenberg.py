"""Text cleaning shared by the sources: newline normalisation and Project Gutenberg header/footer removal."""

import re

# "*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "***START OF THE PROJECT GUTENBERG EBOOK X ***", ...
_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)


def normalise_newlines(text: str) -> str:
    """`\\r\\n` and lone `\\r` -> `\\n` (what Python's text mode does, and so the original tokeniser)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Keep only the text between the first `*** START OF` line and the `*** END OF` line after it.

    Texts without the markers are returned unchanged.
    """
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text


def clean_gutenberg(text: str) -> str:
    """A Project Gutenberg book as plain text: LF newlines, no licence header/footer, no outer blank lines."""
    return strip_gutenberg(normalise_newlines(text)).strip()
