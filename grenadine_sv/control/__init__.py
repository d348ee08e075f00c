"""The control socket: the shared protocol, the client, the server and its request handler."""
