"""The ground floor: what a call *is*, with no I/O.

Errors, the call context, capabilities, portable classes, Media, the serialiser, the uplink
protocol's messages, events, limits and log helpers, and the interface a transport offers.
``host`` and ``client`` stand on this package; nothing here imports either of them, tornado,
or a socket.
"""
