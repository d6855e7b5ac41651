"""``bagelverify verify``: prove the key-pattern properties and print the certificate.

The proofs are the library's (:func:`bagelverify.verify.check_patterns`); this module reads the
arguments and an optional pattern file, and prints the report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..buckets import MATCH_ORDER
from ..errors import PatternError
from ..strict_json import json_type, parse_json
from ..verify import check_patterns
from .render import print_json

EXAMPLE = "bagelverify verify --json"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify verify``."""
    parser.add_argument(
        "--patterns",
        metavar="FILE",
        help='JSON file {"und": [...], "gen": [...], "vae": [...], "extra": [...]} to check '
        "instead of the shipped patterns (a missing bucket means the shipped one)",
    )
    parser.add_argument("--no-z3", action="store_true", help="skip the z3 re-check of P1 and P4")
    parser.add_argument(
        "--z3-timeout", type=float, default=60.0, metavar="SECONDS", help="per z3 query (60)"
    )


def read_pattern_file(path: str) -> dict[str, Any]:
    """The bucket -> pattern-list object of a ``--patterns`` JSON file, checked for shape."""
    with open(path, "rb") as handle:
        document = parse_json(handle.read(), lambda what: PatternError(f"{path}: {what}"))
    if not isinstance(document, dict):
        raise PatternError(
            f"{path}: expected a JSON object with keys und, gen, vae, extra; "
            f"found {json_type(document)}"
        )
    unknown = sorted(set(document) - {b.value for b in MATCH_ORDER})
    if unknown:
        raise PatternError(f"{path}: expected keys und, gen, vae, extra; found {unknown}")
    return document


def run(args: argparse.Namespace) -> int:
    """Print the certificate; exit 1 if any obligation failed."""
    lists = read_pattern_file(args.patterns) if args.patterns else {}
    report = check_patterns(
        **{b.value: lists.get(b.value) for b in MATCH_ORDER},
        use_z3=False if args.no_z3 else None,
        z3_timeout=args.z3_timeout,
    )
    if args.json:
        # ASCII escapes: a witness may hold a lone surrogate, which no terminal encoding prints
        certificate = report.to_json()  # its ok and seconds are the envelope's
        del certificate["ok"], certificate["seconds"]
        print_json({"command": "verify", **certificate}, ascii_only=True)
    elif not args.quiet:
        print(report.format())
    elif not report.ok:
        print(report.format(), file=sys.stderr)
    return 0 if report.ok else 1
