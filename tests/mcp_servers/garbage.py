"""A server that answers every message with a line that is not JSON-RPC."""

import sys

for _line in sys.stdin:
    sys.stdout.write("this is not JSON-RPC\n")
    sys.stdout.flush()
