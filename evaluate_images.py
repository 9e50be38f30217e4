#!/usr/bin/env python
"""Entry point; the command lives in sdxl/cli/evaluate.py (also: `sdxl-evaluate`)."""

import sys

from sdxl.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
