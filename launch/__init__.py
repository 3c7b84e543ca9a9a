"""Training entry point for stateless_opt: ``python -m launch.train`` (see launch/train.py).

Not installed with the library: run it from a checkout (``python launch/train.py`` also works).
"""
