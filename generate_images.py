#!/usr/bin/env python
"""Seed-compatible entry point; the command lives in sdxl/cli/generate.py (also: `sdxl-generate`)."""

import sys

from sdxl.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
