"""moetool: inspect and compress Mixture-of-Experts checkpoints.

Importing the package is cheap on purpose: torch and transformers load only in the
modules that run a model, so `moetool params` stays instant.
"""

__version__ = "0.1.0"
