"""Make ``import reference`` (the float64 reference implementations beside the tests) work however
pytest imports this directory."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Hypothesis profiles (tests/test_fuzz.py): "ci", the default, draws the same examples on every run
# (derandomized: a CI failure reproduces); HYPOTHESIS_PROFILE=thorough draws 10x as many, at random.
# max_examples counts single-process examples; each 2-rank backend runs a twentieth of it.
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=400, derandomize=True, **_FUZZ)
settings.register_profile("thorough", max_examples=4000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
