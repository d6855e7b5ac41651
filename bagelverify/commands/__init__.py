"""Command-line commands that are not a library module's own (see :mod:`bagelverify.cli`)."""
