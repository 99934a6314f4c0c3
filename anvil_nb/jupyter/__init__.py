"""The Jupyter floor: the server extension, the kernel side of ``%load_ext``, and the magics.

The kernel side does not depend on the server extension: a kernel joins any host by
``ANVIL_NB_URL`` and ``ANVIL_NB_SERVER_KEY``, or starts an embedded one.
"""
