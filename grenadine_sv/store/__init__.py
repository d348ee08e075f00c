"""The image store on disk: atomic, checksummed, private images."""
