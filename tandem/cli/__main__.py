"""`python -m tandem.cli ...`: the `tandem` command (torchrun launches ranks this way)."""

import sys

from tandem.cli import main

sys.exit(main())
