"""Print the pattern-language certificate: the same as ``python -m bagelverify verify``.

Usage: ``python proofs/verify_patterns.py [--json] [--patterns FILE] [--no-z3]``.
Exit code 0 when every obligation is proved, 1 when one fails (its witness is printed), 2 on a
usage error. What is and is not proved: ``proofs/README.md``.
"""

from __future__ import annotations

import sys

from bagelverify.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
