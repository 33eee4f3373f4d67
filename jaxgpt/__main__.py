"""`python -m jaxgpt` is the `jaxgpt` command."""

import sys

from jaxgpt.cli import main

sys.exit(main())
