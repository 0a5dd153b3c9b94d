"""Recipe: prompt/response pairs from Shakespeare's Sonnets, for supervised finetuning.

    python launch/prepare.py --config configs/CONFIG.yaml --data.source=sonnets.txt --data.recipe=sonnets_sft --finetune.kind=sft

Each sonnet is a line holding its Roman numeral, then its lines. A pair is
    prompt:   the numeral and the first line, e.g. "XVIII\\nShall I compare thee to a summer's day?"
    response: the remaining lines (trailing spaces and a common indent removed, the couplet's indent kept).
Sonnets 10, 20, ..., 150 (every VAL_EVERY-th, 15 of 154) are held out for validation, the rest train.
Sonnets are numbered by their order in the file and the prompt uses that numeral (Project Gutenberg's
text labels sonnet 128 "CXXXIII"). A raw Project Gutenberg file works too: everything before
"*** START OF THE PROJECT GUTENBERG EBOOK ..." and from "*** END OF ..." on is dropped, and a heading
with no lines under it (a table of contents) is skipped.
"""

from __future__ import annotations

import re
import textwrap

from dist_gpt.prepare import strip_gutenberg

VAL_EVERY = 10
NUMERAL = re.compile(r"\s*[IVXLC]+\.?\s*")


def roman(n: int) -> str:
    out = ""
    for value, letters in (
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ):
        count, n = divmod(n, value)
        out += letters * count
    return out


def sonnets(text: str) -> list[list[str]]:
    """The sonnets in file order, each as its lines: the first block of non-blank lines under a numeral."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    poems: list[list[str]] = []
    lines: list[str] | None = None  # the sonnet being read; None outside one
    for line in text.split("\n"):
        if NUMERAL.fullmatch(line):
            lines = []
            poems.append(lines)
        elif lines is not None and line.strip():
            lines.append(line.rstrip())
        elif lines:  # a blank line ends the sonnet
            lines = None
    return [textwrap.dedent("\n".join(p)).split("\n") for p in poems if p]  # an indented file gets the same pairs


def records(text: str) -> list[dict]:
    """One prompt/response pair per sonnet; every VAL_EVERY-th sonnet is marked for validation."""
    return [
        {
            "prompt": f"{roman(n)}\n{lines[0].strip()}",
            "response": "\n".join(lines[1:]),
            "split": "val" if n % VAL_EVERY == 0 else "train",
        }
        for n, lines in enumerate(sonnets(text), start=1)
    ]
