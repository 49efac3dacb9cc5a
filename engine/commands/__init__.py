"""One module per ``dbd`` subcommand: ``add_arguments(parser)`` and ``main(args)``."""
