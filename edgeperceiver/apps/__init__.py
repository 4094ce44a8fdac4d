"""Applications built on the library: the demo (the command line is ``edgeperceiver.cli``)."""
