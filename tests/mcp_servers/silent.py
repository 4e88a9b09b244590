"""A server that reads its stdin and never answers `initialize`."""

import sys

for _line in sys.stdin:
    pass
