"""Recipe: a Project Gutenberg book as plain text, without Gutenberg's header and licence.

    python launch/prepare.py --data.source=https://www.gutenberg.org/cache/epub/1041/pg1041.txt --data.recipe=gutenberg

Everything before "*** START OF THE PROJECT GUTENBERG EBOOK ..." and from "*** END OF ..." on is dropped;
a file without those markers passes unchanged. One document, so the usual split applies (the last
data.val_fraction of the text validates).
"""

from __future__ import annotations

from dist_gpt.prepare import strip_gutenberg


def records(text: str) -> list[dict]:
    return [{"text": strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))}]
