"""The commands' work: pipeline, experiment, evaluate, bench, and the LightningCLI that runs one stage.

Layer: above ``lit``, ``data_modules`` and ``callbacks``; only ``xrec_pl.cli`` (the dispatcher) imports from here.
"""
