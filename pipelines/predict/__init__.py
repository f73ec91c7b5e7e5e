"""Batch prediction (``fluxo predict``): the service's model, validation and decoding over a whole file.

``sources`` reads inputs in chunks, ``run`` drives the loop, writes Parquet and records the
MLflow run. Nothing here imports torch.
"""
