"""Make ``import reference`` (the float64 reference implementations beside the tests) work however
pytest imports this directory."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
