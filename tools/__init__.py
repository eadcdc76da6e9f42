"""hublab-tools: the workstation half of HubLab IO (training, conversion, quantization, deploy).

Installed as the import package `hublabio_tools` (from the folder tools/). Verb modules import
torch/transformers lazily so that `hublab-tools --help` stays fast and torch-free.
"""
