"""HubLab IO on-device runtime: daemon, shell, model pool and MoE routing.

Nothing under this package may import torch or transformers.
"""

__version__ = "0.1.0"
