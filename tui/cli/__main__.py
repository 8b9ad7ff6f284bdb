"""``python -m tui.cli``: the same as the ``persona`` console script."""

import sys

from tui.cli.main import main

sys.exit(main())
