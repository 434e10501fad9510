#!/usr/bin/env python3
"""Run the zchat terminal client from a checkout: same as `zchat client`."""

import sys

from zchat.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
