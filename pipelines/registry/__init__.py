"""The model lifecycle after export: register, gate, aliases, promote, publish, follow, and the model store.

Monitor, batch prediction, the gate and `fluxo serve` fetch models through its store
(pipelines/registry/store.py); nothing here imports torch.
"""
