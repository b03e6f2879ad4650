"""The deployment guide embeds each file of docs/examples/ exactly.

The peer tests configure Postfix and Dovecot from those files, so this check
makes the guide show what the tests run.  An embedded file is a fenced
block right after a line ``<!-- example: NAME -->``.
"""

from __future__ import annotations

import re

from tests.peers.examples import EXAMPLES_DIR, GUIDE

EMBED = re.compile(r"<!-- example: (?P<name>\S+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)


def embedded_blocks() -> list[tuple[str, str]]:
    return [(m["name"], m["body"]) for m in EMBED.finditer(GUIDE.read_text())]


def test_guide_blocks_equal_example_files() -> None:
    blocks = embedded_blocks()
    assert blocks, f"no embedded examples found in {GUIDE}"
    for name, body in blocks:
        path = EXAMPLES_DIR / name
        assert path.is_file(), f"{GUIDE.name} embeds {name}, which is not in {EXAMPLES_DIR}"
        assert body == path.read_text(), f"{GUIDE.name}: block for {name} differs from the file"


def test_guide_embeds_every_example() -> None:
    embedded = {name for name, _body in embedded_blocks()}
    files = {str(p.relative_to(EXAMPLES_DIR)) for p in EXAMPLES_DIR.rglob("*") if p.is_file()}
    assert files - embedded == set()


def test_guide_has_no_unmarked_example_copies() -> None:
    text = GUIDE.read_text()
    markers = text.count("<!-- example: ")
    assert markers == len(embedded_blocks()), "a marker is not followed by a fenced block"
