import os
import sys

# tests/reference.py, the float64 oracle, is imported as `reference`.
sys.path.insert(0, os.path.dirname(__file__))
