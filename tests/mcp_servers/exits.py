"""A server that exits at once, before answering anything."""

import sys

sys.exit(2)
