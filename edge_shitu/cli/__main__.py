"""``python -m edge_shitu.cli``: the same as the ``edge-shitu`` command."""

import sys

from edge_shitu.cli import main

sys.exit(main())
