"""Orchestration: Prefect flows over the same dlpipe.stages functions that dvc.yaml runs."""
