"""``python -m cm3leon_lightning`` is the ``cm3leon`` command."""

import sys

from cm3leon_lightning.cli import main

# argparse names the program after argv[0]: "cm3leon", not "__main__.py", in usage lines and errors
sys.argv[0] = "cm3leon"
sys.exit(main())
