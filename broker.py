#!/usr/bin/env python3
"""Run the zchat broker from a checkout: same as `zchat broker`."""

import sys

from zchat.cli import main

if __name__ == "__main__":
    sys.exit(main(["broker", *sys.argv[1:]]))
