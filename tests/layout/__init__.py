"""Checks of the tree's layout, run by ``make check`` (``python -m tests.layout``): the import
rule (:mod:`.imports`) and one definition of each shared helper (:mod:`.definitions`)."""
