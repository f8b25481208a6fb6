"""The command line: the flags of every command (argparse) and ``main`` in :mod:`convnet.cli.parser`,
what each command does in :mod:`convnet.cli.commands`. The only modules that know argparse.
"""
