"""``python -m fastvlm``: the same command line as the ``fastvlm`` script."""

import sys

from .cli import main

sys.exit(main())
