"""The subcommands, one thin module each: ``add_arguments(parser)`` and ``main(args) -> int`` parse the arguments,
call the library (the stages, the pre-flight step) and print the result; ``mocolab.cli`` lists them and ends every
command the same way. Nothing below this package imports it."""
