"""``python -m lorakit ...``: the ``lorakit`` command, for an environment whose scripts directory is
not on PATH."""
import sys

from lorakit.cli import main

sys.exit(main())
