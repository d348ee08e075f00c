"""CRIU: finding the binary, the pycriu client, and facts read from a finished dump."""
