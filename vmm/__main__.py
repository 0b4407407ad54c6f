"""``python -m vmm``: the same as the ``vmm`` command."""

import sys

from vmm.cli import main

sys.exit(main())
