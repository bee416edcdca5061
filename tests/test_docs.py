"""The docs under docs/ stay true: the worked hash example is recomputed from the formulas and by
chainfold itself, every command and option of the CLI is documented, and nothing cites the old
internal "SPEC §" numbering.

``python tests/test_docs.py`` prints the worked example block, to paste into docs/formats.md when
the format changes on purpose (with a format version bump).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BEGIN = "<!-- worked-example:begin -->"
END = "<!-- worked-example:end -->"


def _sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _events():
    from chainfold.envelope import Event

    return [
        Event("evt-1", "acct-1", 1, "Opened", 1_700_000_000_000, {"owner": "Ada"}),
        Event("evt-2", "acct-1", 2, "Deposited", 1_700_000_001_000, {"amount": 500}),
        Event("evt-3", "acct-1", 3, "Withdrawn", 1_700_000_002_000, {"amount": 200}),
    ]


def worked_example() -> str:
    """The block of docs/formats.md between the markers, computed from the formulas (hashlib only)
    and checked against chainfold's own ChainBuilder and merkle module."""
    from chainfold import merkle
    from chainfold.envelope import encode, event_to_json
    from chainfold.hashing.chain import ChainBuilder

    evs = _events()
    payloads = [encode(e) for e in evs]
    leaves = [_sha(b"\x00", p) for p in payloads]
    root0 = _sha(b"\x01", leaves[0], leaves[1])  # segment 0: entries 0-1
    root1 = leaves[2]  # segment 1 so far: entry 2 alone (a one-leaf tree's hash is its leaf)
    head0 = _sha(b"\x02", bytes(32), struct.pack(">Q", 2), root0)
    head1 = _sha(b"\x02", head0, struct.pack(">Q", 3), root1)
    log_root = _sha(b"\x01", root0, leaves[2])  # RFC 9162 tree over 3 leaves: split at 2

    builder = ChainBuilder(2)
    full = [cp for i, p in enumerate(payloads) if (cp := builder.add(p, f"7:{i}:-1:-1")) is not None]
    pend = builder.pending()
    assert [cp.root for cp in full] == [root0] and [cp.head for cp in full] == [head0]
    assert pend is not None and pend.root == root1 and pend.head == head1
    assert merkle.root(leaves) == log_root == builder.log_root()

    rows = "\n".join(f"| {i} | `{json.dumps(event_to_json(e), separators=(',', ':'))}` |" for i, e in enumerate(evs))
    hexes = "\n".join(f"payload_{i} = {p.hex()}" for i, p in enumerate(payloads))
    lines = [
        BEGIN,
        "Three events of account `acct-1`, segment size S = 2 (so that one segment is full and one is not):",
        "",
        "| i | event (as `chainfold read` shows it) |",
        "|---|---|",
        rows,
        "",
        "Their payloads, canonical CBOR, in hex:",
        "",
        "```",
        hexes,
        "```",
        "",
        "```",
        *(f"leaf_{i}  = SHA-256(00 || payload_{i}) = {h.hex()}" for i, h in enumerate(leaves)),
        "",
        f"root_0  = SHA-256(01 || leaf_0 || leaf_1) = {root0.hex()}",
        "head_0  = SHA-256(02 || head_-1 || uint64_be(2) || root_0)",
        f"        = {head0.hex()}",
        f"root_1  = leaf_2 (a tree of one leaf)      = {root1.hex()}",
        "head_1  = SHA-256(02 || head_0 || uint64_be(3) || root_1)   (provisional: segment 1 is not full)",
        f"        = {head1.hex()}",
        "log root (RFC 9162, 3 leaves) = SHA-256(01 || root_0 || leaf_2)",
        f"        = {log_root.hex()}",
        "```",
        "",
        "head_-1 is 32 zero bytes; `||` is concatenation; 00, 01, 02 are single bytes. With message ids",
        "`7:0:-1:-1` .. `7:2:-1:-1`, the log's record holds one full checkpoint (`checkpoints.jsonl`) and",
        "one provisional one (`checkpoints.jsonl.partial`):",
        "",
        "```json",
        json.dumps(full[0].to_json(), separators=(", ", ": ")),
        json.dumps(pend.to_json(), separators=(", ", ": ")),
        "```",
        END,
    ]
    return "\n".join(lines)


def test_the_worked_hash_example_is_computed_by_the_code() -> None:
    text = (DOCS / "formats.md").read_text(encoding="utf-8")
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    fresh = worked_example()
    assert block == fresh, "docs/formats.md's worked example drifted; the block should read:\n" + fresh


def _commands() -> list[tuple[str, click.Command]]:
    from chainfold.cli import cli

    out: list[tuple[str, click.Command]] = []

    def walk(prefix: str, cmd: click.Command) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(f"{prefix} {name}".strip(), sub)
        else:
            out.append((prefix, cmd))

    walk("", cli)
    return out


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    sections = {m.group(1): m.start() for m in re.finditer(r"^### `chainfold ([a-z ]+)`", text, re.M)}
    missing = []
    for name, cmd in _commands():
        if name not in sections:
            missing.append(f"section for `chainfold {name}`")
            continue
        start = sections[name]
        end = min([p for p in sections.values() if p > start] + [len(text)])
        body = text[start:end]
        for p in cmd.params:
            if isinstance(p, click.Option):
                names = [o for o in p.opts if o.startswith("--")]
                if names and names[0] not in ("--help",) and names[0] not in body and not _common(p, text):
                    missing.append(f"{names[0]} of `chainfold {name}`")
    assert not missing, "docs/cli.md does not document: " + ", ".join(missing)


def _common(p: click.Option, text: str) -> bool:
    """Options shared by many commands are documented once, under "Options every command takes"."""
    common = text[text.index("## Options every command takes"):text.index("## Commands")]
    return any(o in common for o in p.opts if o.startswith("--"))


def test_help_texts_point_to_the_docs_and_nothing_cites_spec_sections() -> None:
    offenders = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("src/chainfold/**/*.py")]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "SPEC §" in line or "SPEC.md" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, "cites the internal SPEC instead of docs/: " + ", ".join(offenders)


@pytest.mark.parametrize("page", ["README.md", "formats.md", "worker-evidence.md", "cli.md", "models.md",
                                  "incidents.md"])
def test_doc_links_resolve(page: str) -> None:
    path = DOCS / page
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)", text):
        if target == "corrections.md" and not (DOCS / target).exists():
            continue  # written by the corrections work; linked ahead of it
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


if __name__ == "__main__":
    print(worked_example())
