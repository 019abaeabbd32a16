"""``python -m triqdef``: the ``triqdef`` command line ([`triqdef.cli`][triqdef.cli])."""

from __future__ import annotations

import sys

from triqdef.cli import main

if __name__ == "__main__":
    sys.exit(main())
