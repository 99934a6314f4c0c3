"""The web floor: tornado handlers over the host, the route table, the listener, the service.

Handlers only translate between HTTP/WebSocket and the host's methods. :mod:`~anvil_nb.web.service`
is the one assembly (keys, host, housekeeping, listener) that all three placements use.
"""
