"""``mgll benchmark``: encoders over named tasks, the paper's table reproduced (docs/benchmark.md).

``tasks`` is the registry of the paper's ten downstream rows (as data) and the reader of task
files; ``protocols`` is the only module that calls :mod:`mgll.eval` (data, probe, fine-tune,
zero-shot); ``summary`` pools seeds and pairs encoders into ``benchmark.json`` and the tables;
``report`` writes the HTML page; ``cli`` is the command. Like :mod:`mgll.eval`, this package
itself stays light so the CLI's help is fast.
"""
