"""Training entry point for stateless_opt, installed as ``stateless_opt.launch``:
``stateless-opt-train`` (or ``python -m stateless_opt.launch.train``; ``python -m launch.train`` in a
checkout). Needs the ``launch`` extra: ``pip install 'stateless-opt[launch]'``."""

from stateless_opt.extras import require

require("launch", "stateless_opt.launch")
