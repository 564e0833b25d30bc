"""``python -m cm3leon_lightning`` is the ``cm3leon`` command."""

import sys

from cm3leon_lightning.cli import main

sys.exit(main())
