"""The dictionary assistant: `chatforge run`'s demo of the whole recipe on WordNet, the Python docs and
chatterbot-corpus. `corpora` reads the data, `dictionary` is the task and its ground truth (the simulated
annotator), `pipeline` runs every stage in order, `report` writes the report card.

The library never imports this package: everything here is one use of chatforge, not part of it.
"""
