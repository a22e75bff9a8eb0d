"""mlip-ds: MLIP vision-language pretraining for chest radiographs.

Data flow: sources -> shards (tools/make_shards.py) -> data (batches) -> model outputs -> losses -> train step.
"""
__version__ = "0.1.0"
