"""The simulated Anthropic upstream (`sidecard sim`), for tests, benchmarks and `serve --simulate`."""

from .accounting import Limits
from .faults import Fault
from .server import Call, ModelStats, Simulator, serve_sim

__all__ = ["Call", "Fault", "Limits", "ModelStats", "Simulator", "serve_sim"]
