"""The client: one process's connection to a host, which makes calls and serves callables.

:mod:`~anvil_nb.client.client` holds the calling and serving logic, the function table and the
call-local state; :mod:`~anvil_nb.client.websocket` is the network transport,
:mod:`~anvil_nb.client.capture` routes what a served call prints. Never imports
:mod:`anvil_nb.host`: the in-process transport comes from the host floor and is handed in.
"""
