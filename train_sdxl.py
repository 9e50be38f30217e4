#!/usr/bin/env python
"""Seed-compatible entry point; the command lives in sdxl/cli/train.py (also: `sdxl-train`)."""

import sys

from sdxl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
