"""What the conversion APIs and the command-line tools share: refusing bad input
(:mod:`.errors`), writing outputs all or nothing (:mod:`.atomic_write`), reading checkpoints
safely (:mod:`.checkpoint_io`), checking that checkpoints and datasets exist
(:mod:`.checkpoint_check`, :mod:`.data_check`), the train/test command line (:mod:`.cli`),
text tables (:mod:`.text_table`) and the environment line for bug reports (:mod:`.env_report`).

Import the submodule you need: importing this package loads none of them.
"""
