"""inferhub: a self-hostable model-serving platform."""

from inferhub.engine.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
__version__ = "0.1.0"
