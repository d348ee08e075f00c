"""grenadine-sv: a process supervisor whose programs CRIU can checkpoint and restore."""

__version__ = "0.1.0"
