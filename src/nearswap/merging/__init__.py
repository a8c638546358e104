"""The merge, in the order it runs: read -> plan -> pass -> write -> report.

``recipe`` (what to merge: built once, for the CLI and the API alike), ``plan`` (every input
opened and checked before the first tensor byte is read; one task per output tensor),
``passes`` (``ChainPass``: each chunk through the chain of NearSwap steps; ``CopyPass``:
convert), ``sinks`` (a directory, a .gguf file or ``null:``, with one report builder),
``adoption`` (resume: a killed run's partial output re-checked and continued),
``side_files`` (configs and tokenizer files beside the weights), ``layout`` (the names of the
files written beside them), ``report`` (the typed report and its table), ``convert``.
Memory is bounded by threads x chunk x models, not by model size.
"""
