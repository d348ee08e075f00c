"""The grenadine-sv command line: parsing, sub-commands, output formatting."""
