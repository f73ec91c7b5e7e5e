"""fluxo pipeline steps: data → train → export, orchestrated by Prefect flows."""
