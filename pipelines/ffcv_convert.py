"""The `.beton` converter lives in datasources/ffcv_convert.py (datasets are written there, loaders read
them here). `python -m pipelines.ffcv_convert`, the name earlier releases printed, still converts and
says the new name."""

from __future__ import annotations

import sys

from datasources.ffcv_convert import main

if __name__ == "__main__":
    print("note: the converter is now python -m datasources.ffcv_convert (same options)", file=sys.stderr)
    sys.exit(main())
