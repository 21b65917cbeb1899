"""One module per `replay` subcommand: configure(parser) and run(args) -> int."""
