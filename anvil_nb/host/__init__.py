"""The host: apps, their registries and sessions, and the dispatcher that routes every call.

Pure asyncio and no tornado: the web floor (:mod:`anvil_nb.web`) puts it on the network, and
:mod:`anvil_nb.host.inprocess` runs it on a thread of the current process (the embedded
placement). Never imports :mod:`anvil_nb.client`.
"""
